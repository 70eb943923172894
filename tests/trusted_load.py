"""torch.load of the training checkpoints our fixture scripts made (they pickle a Namespace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ckpt_doctor.torchload import namespace_allowed


def load_training_checkpoint(path: Path) -> Any:
    """weights_only, with argparse.Namespace allowed as ckpt-doctor allows it."""
    with namespace_allowed():
        return torch.load(path, map_location="cpu", weights_only=True)
