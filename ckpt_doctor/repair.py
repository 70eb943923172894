"""``repair``: write a fixed copy for the findings that can be fixed, listing every change.

- unwrap a container (CONTAINER_NESTED / LOAD_NOTHING): keep the state dict, drop the rest;
- strip known key prefixes (KEY_PREFIX);
- broadcast legacy scalar gates to per-head gates (GATE_SHAPE);
- ``bake_tanh``: replace g by tanh(g), so raw-gate inference matches tanh-gate training
  (GATE_TANH_MISMATCH);
- ``restore_base``: put drifted frozen tensors back from the base (BASE_MODIFIED).
Nothing else changes. The input is never modified; the output is written atomically. The
repaired tensors get the value and gate checks inspect runs (a NaN adapter is not "nothing to
repair"); a safetensors output carries the input's metadata, updated (extract's definition).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckpt_doctor import keys
from ckpt_doctor.atomic import check_destination, write_atomically
from ckpt_doctor.checks import content_findings
from ckpt_doctor.diffing import Progress, diff_tensors
from ckpt_doctor.errors import RefusedError, UsageError
from ckpt_doctor.extraction import adapter_metadata, output_format
from ckpt_doctor.facts import AdapterConfig, ModelFacts, adapter_config, model_facts
from ckpt_doctor.families import (
    detect_family,
    is_adapter_key,
    require_runs_here,
    v1_gate_layers,
)
from ckpt_doctor.findings import Finding, exit_code_for
from ckpt_doctor.handles import TensorHandle, from_torch
from ckpt_doctor.inspection import FULL_SCAN_BYTES
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.transforms import Transforms, broadcast_gate, tanh_baked, tanh_gate
from ckpt_doctor.units import human_bytes


@dataclass(frozen=True)
class Change:
    kind: str
    detail: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class RepairReport:
    source: Path
    output: Path | None
    changes: list[Change]
    findings: list[Finding] = field(default_factory=list)  # about the repaired tensors

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output) if self.output else None,
            "changes": [vars(c) for c in self.changes],
            "findings": [f.to_json() for f in self.findings],
        }


def _facts(
    tensors: dict[str, TensorHandle], ckpt: Checkpoint, base: Checkpoint | None
) -> ModelFacts:
    facts = model_facts(tensors, params=base.params if base else ckpt.params)
    if base is not None:
        facts = model_facts(base.canonical(), params=base.params, fallback=facts)
    return facts


def plan_repair(
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    bake_tanh: bool = False,
    restore_base: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, TensorHandle], list[Change]]:
    """The repaired tensors (as handles) and the list of changes; nothing is written."""
    require_runs_here(detect_family(ckpt.canonical()), ckpt.path, command="repair")
    changes: list[Change] = []
    tensors = dict(ckpt.tensors)
    if ckpt.container_path:
        dropped = ", ".join(f"{k} ({e.summary})" for k, e in ckpt.entries.items())
        where = ckpt.container_subscripts
        changes.append(Change("unwrap", f"kept checkpoint{where}; dropped {dropped or 'nothing'}"))
    rewrite = ckpt.prefix
    if rewrite is not None:
        tensors = {keys.strip_prefix(k, rewrite.prefix): h for k, h in tensors.items()}
        changes.append(
            Change(
                "strip-prefix", f"removed '{rewrite.prefix}' from {rewrite.keys_with_prefix} keys"
            )
        )
    base_tensors = base.canonical() if base is not None else {}
    facts = _facts(tensors, ckpt, base)
    gates = v1_gate_layers(tensors)
    scalar = [gates[i] for i in gates if tensors[gates[i]].numel == 1]
    if scalar:
        heads = facts.n_heads
        if not heads:
            raise RefusedError(
                f"{ckpt.path}: scalar gates need the model's head count to broadcast",
                code="GATE_SHAPE",
                hint="pass --base with params.json",
            )
        for name in scalar:
            tensors[name] = from_torch(name, broadcast_gate(tensors[name].to_torch(), heads=heads))
        changes.append(Change("broadcast-gates", f"scalar [1] -> [1, {heads}, 1, 1]", scalar))
    if bake_tanh and gates and tanh_baked(ckpt.metadata):
        # tanh(tanh(g)) would under-weight the adapter: baking is done once.
        raise RefusedError(
            f"{ckpt.path}: its metadata says tanh is already baked into the gates",
            code="GATE_TANH_MISMATCH",
            hint="use this file with raw-gate inference as it is; leave out --bake-tanh",
        )
    if bake_tanh and gates:
        for name in gates.values():
            tensors[name] = from_torch(name, tanh_gate(tensors[name].to_torch()))
        changes.append(
            Change("bake-tanh", "gates g -> tanh(g) for raw-gate inference", list(gates.values()))
        )
    if restore_base:
        if base is None:
            raise UsageError("--restore-base needs --base", hint="pass the base weights")
        diff = diff_tensors(tensors, base_tensors, progress=progress)
        drifted = [t.name for t in diff.with_status("modified") if not is_adapter_key(t.name)]
        for name in drifted:
            tensors[name] = base_tensors[name].named(name)
        if drifted:
            changes.append(Change("restore-base", "drifted frozen tensors put back", drifted))
    return tensors, changes


def repair(
    ckpt: Checkpoint,
    out: Path,
    *,
    base: Checkpoint | None = None,
    bake_tanh: bool = False,
    restore_base: bool = False,
    fmt: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> RepairReport:
    fmt = output_format(out, fmt)
    check_destination(out, force=force, sources=[*ckpt.inputs(), *(base.inputs() if base else [])])
    tensors, changes = plan_repair(
        ckpt, base=base, bake_tanh=bake_tanh, restore_base=restore_base, progress=progress
    )
    # What the file records: the source's transforms plus this repair's (verify redoes them).
    done = {c.kind for c in changes}
    before = Transforms.from_metadata(ckpt.metadata)
    transforms = replace(
        before,
        broadcast=before.broadcast or "broadcast-gates" in done,
        baked=before.baked or "bake-tanh" in done,
    )
    baked = transforms.baked
    facts = _facts(tensors, ckpt, base)
    adapter = adapter_config(tensors, args=ckpt.args, metadata=ckpt.metadata)
    small = sum(h.nbytes for h in tensors.values()) <= FULL_SCAN_BYTES
    findings = content_findings(tensors, facts, adapter, scan_all=small, tanh_baked=baked)
    if not changes:
        return RepairReport(ckpt.path, None, [], findings)
    if baked and fmt == "pth":
        # Only safetensors metadata can say the gates are baked; say it here instead.
        changes = [
            replace(c, detail=c.detail + " (a .pth cannot record this: do not bake it again)")
            if c.kind == "bake-tanh"
            else c
            for c in changes
        ]

    def save(tmp: Path) -> None:
        _save(tensors, tmp, fmt, ckpt, adapter=adapter, facts=facts, transforms=transforms)

    write_atomically(out, save)
    size = out.stat().st_size
    changes.append(Change("wrote", f"{len(tensors)} tensors, {human_bytes(size)}"))
    return RepairReport(ckpt.path, out, changes, findings)


def _save(
    tensors: dict[str, TensorHandle],
    path: Path,
    fmt: str,
    ckpt: Checkpoint,
    *,
    adapter: AdapterConfig | None,
    facts: ModelFacts,
    transforms: Transforms,
) -> None:
    import torch

    # Own memory per tensor: torch.save would otherwise write whole shared storages.
    state = {k: h.to_torch().clone() for k, h in tensors.items()}
    if fmt == "safetensors":
        from ckpt_doctor.safetensors_format import save as save_file  # in place: see there

        # The input's metadata carried over, then what extract records, for these tensors.
        carried = dict(ckpt.metadata or {})
        carried.update(
            {k: str(v) for k, v in (ckpt.args or {}).items() if k.startswith("adapter_")}
        )
        fresh = adapter_metadata(
            state, adapter=adapter, facts=facts, source=ckpt.path.name, transforms=transforms
        )
        save_file(state, str(path), metadata={**carried, **{k: v for k, v in fresh.items() if v}})
    else:
        torch.save(state, path)
