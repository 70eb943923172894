"""torch.load of the training checkpoints our fixture scripts made (they pickle a Namespace)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def load_training_checkpoint(path: Path) -> Any:
    """weights_only, with argparse.Namespace allowed: scoped on torch >= 2.5, global on 2.4."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)
