"""Builders shared by the finding tests: tiny checkpoints made in tmp_path and inspected."""

from __future__ import annotations

from pathlib import Path

import torch

from ckpt_doctor.findings import Finding
from ckpt_doctor.inspection import InspectReport, inspect_checkpoint
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    save_zip,
    training_checkpoint,
    write_meta_dir,
)

CFG = TinyConfig()
ADAPTED = list(CFG.adapted_layers)  # [2, 3]


def base_sd() -> dict[str, torch.Tensor]:
    return base_state_dict(CFG)


def adapter(cfg: TinyConfig = CFG, **kw) -> dict[str, torch.Tensor]:
    return adapter_tensors(cfg, **kw)


def full_sd() -> dict[str, torch.Tensor]:
    """A flat fine-tuned model: base weights plus the adapter tensors."""
    return {**base_sd(), **adapter()}


def training(adapter_sd: dict | None = None, **kw) -> dict:
    return training_checkpoint(
        CFG, base_sd(), adapter() if adapter_sd is None else adapter_sd, **kw
    )


def write_base(tmp_path: Path, cfg: TinyConfig = CFG) -> Path:
    directory = tmp_path / f"base-{cfg.dim}"
    write_meta_dir(base_state_dict(cfg), directory, cfg)
    return directory


def inspect(tmp_path: Path, obj: object, *, base: Path | None = None) -> InspectReport:
    """Save ``obj`` as a torch zip checkpoint and inspect it (against ``base`` if given)."""
    path = save_zip(obj, tmp_path / "ckpt.pth")
    return inspect_path(path, base=base)


def inspect_path(path: Path, *, base: Path | None = None) -> InspectReport:
    ckpt = open_checkpoint(path)
    return inspect_checkpoint(ckpt, base=open_checkpoint(base) if base else None)


def ids(report: InspectReport) -> set[str]:
    return {f.id for f in report.findings}


def only(report: InspectReport, finding_id: str, severity: str) -> Finding:
    """The single finding with this id; its severity must be the one the spec gives."""
    found = [f for f in report.findings if f.id == finding_id]
    assert len(found) == 1, [f.message for f in report.findings]
    assert found[0].severity == severity
    assert found[0].hint
    return found[0]
