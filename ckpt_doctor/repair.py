"""``repair``: write a fixed copy for the findings that can be fixed, listing every change, by
the file's family's own rules.

- unwrap a container (CONTAINER_NESTED / LOAD_NOTHING): keep the state dict, drop the rest (a
  family whose own code reads ``['model']``, v2 and litgpt, keeps that one level);
- strip wrapper segments and other families' prefixes (KEY_PREFIX); a family's own prefix
  (``llama.`` of v2 multimodal, PEFT's ``base_model.model.``) stays;
- broadcast legacy scalar gates to per-head gates (GATE_SHAPE);
- ``bake_tanh``: replace g by tanh(g), so raw-gate inference matches tanh-gate training
  (GATE_TANH_MISMATCH; LLaMA-Adapter v1 only, the one family whose inference is raw);
- ``restore_base``: put drifted frozen tensors back from the base (BASE_MODIFIED).
Nothing else changes. The input is never modified; the output is written atomically in the
family's layout. The repaired tensors get the value and gate checks inspect runs (a NaN adapter
is not "nothing to repair"); a safetensors output carries the input's metadata, updated
(extract's definition).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckpt_doctor import keys, layouts
from ckpt_doctor.adapters import checkpoint_adapter, checkpoint_family
from ckpt_doctor.checks import content_findings
from ckpt_doctor.diffing import Progress, diff_tensors
from ckpt_doctor.errors import RefusedError, UsageError
from ckpt_doctor.extraction import adapter_metadata, lora_peft_config, peft_config
from ckpt_doctor.facts import ModelFacts, model_facts
from ckpt_doctor.families import PEFT_LORA, UNKNOWN, Family, peft, require_runs_here
from ckpt_doctor.families.llama_adapter_v2 import MULTIMODAL
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


def _canonical(tensors: dict[str, TensorHandle]) -> dict[str, TensorHandle]:
    return {keys.canonical_name(n): h for n, h in tensors.items()}


def plan_repair(
    ckpt: Checkpoint,
    *,
    family: Family | None,
    base: Checkpoint | None = None,
    bake_tanh: bool = False,
    restore_base: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, TensorHandle], list[Change]]:
    """The repaired tensors (as handles, under the names the family's own code expects) and
    the list of changes; nothing is written."""
    changes: list[Change] = []
    own_prefix = family.loader.own_prefix if family is not None else ""
    container = family.loader.container if family is not None else None
    own_layout = ckpt.container_path == ((container,) if container else ())
    # v2 multimodal's layout carries a 'config' beside 'model' (written back from the tensors).
    extra = {k: e for k, e in ckpt.entries.items() if not (k == "config" and family is MULTIMODAL)}
    if ckpt.container_path and not (own_layout and not extra):
        dropped = ", ".join(f"{k} ({e.summary})" for k, e in extra.items())
        kept = f"kept checkpoint{ckpt.container_subscripts}" + (
            f" as ['{container}'], where {family.name} reads it" if container else ""
        )
        changes.append(Change("unwrap", f"{kept}; dropped {dropped or 'nothing'}"))
    tensors: dict[str, TensorHandle] = {}
    renamed = 0
    for saved, handle in ckpt.tensors.items():
        name = layouts.own_name(family, keys.canonical_name(saved), saved)
        tensors[name] = handle
        renamed += name != saved
    rewrite = ckpt.prefix
    foreign = rewrite.foreign(own_prefix) if rewrite is not None else []
    if renamed:
        shown = " + ".join(f"'{p}'" for p in foreign)
        what = f"removed {shown} from" if foreign else "renamed"
        changes.append(
            Change("strip-prefix", f"{what} {renamed} keys (the names its own code expects)")
        )
    facts = _facts(_canonical(tensors), ckpt, base)
    gate = family.gate if family is not None else None
    own_gates = {
        name: saved
        for saved in tensors
        if family is not None and family.gate_layers([name := keys.canonical_name(saved)])
    }
    scalar = [own_gates[n] for n in own_gates if tensors[own_gates[n]].numel == 1]
    if scalar and gate is not None and gate.shape == "heads":
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
    if bake_tanh:
        _bake(ckpt, family, tensors, list(own_gates.values()), changes)
    if restore_base:
        if base is None:
            raise UsageError("--restore-base needs --base", hint="pass the base weights")
        base_tensors = base.canonical()
        canon = {keys.canonical_name(n): n for n in tensors}
        diff = diff_tensors(_canonical(tensors), base_tensors, family=family, progress=progress)
        drifted = [canon[t.name] for t in diff.with_status("modified") if not t.is_adapter]
        for name in drifted:
            # The base's values in the saved layout (an HF name keeps HF's row order).
            tensors[name] = _saved_layout(base, keys.canonical_name(name), name)
        if drifted:
            changes.append(Change("restore-base", "drifted frozen tensors put back", drifted))
    return tensors, changes


def _bake(
    ckpt: Checkpoint,
    family: Family | None,
    tensors: dict[str, TensorHandle],
    gates: list[str],
    changes: list[Change],
) -> None:
    """g -> tanh(g), once, for the one family whose own inference applies gates raw although
    its training applied tanh (LLaMA-Adapter v1)."""
    gate = family.gate if family is not None else None
    if not gates:
        return
    if gate is None or not gate.switchable:
        name = family.name if family is not None else "this file"
        how = gate.inference if gate is not None else "its own"
        raise UsageError(
            f"--bake-tanh: {name} applies {how} gates at inference as in training; there is "
            "nothing to bake",
            hint="leave out --bake-tanh",
        )
    if tanh_baked(ckpt.metadata):
        # tanh(tanh(g)) would under-weight the adapter: baking is done once.
        raise RefusedError(
            f"{ckpt.path}: its metadata says tanh is already baked into the gates",
            code="GATE_TANH_MISMATCH",
            hint="use this file with raw-gate inference as it is; leave out --bake-tanh",
        )
    for name in gates:
        tensors[name] = from_torch(name, tanh_gate(tensors[name].to_torch()))
    changes.append(Change("bake-tanh", "gates g -> tanh(g) for raw-gate inference", gates))


def _saved_layout(base: Checkpoint, canonical: str, name: str) -> TensorHandle:
    """The base tensor ``canonical`` as the repaired file stores it (raw, not un-permuted)."""
    for saved, handle in base.tensors.items():
        if keys.canonical_name(saved) == canonical and keys.hf_rotary(keys.model_name(saved)):
            return handle.named(name)  # HF's own q/k row order, as the file had it
    return base.canonical()[canonical].named(name)


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
    family = checkpoint_family(ckpt.borrow_params(base))
    if family is UNKNOWN:
        require_runs_here(family, ckpt.path, command="repair")
    dest = layouts.destination(out, family, fmt)
    layouts.check(dest, force=force, sources=[*ckpt.inputs(), *(base.inputs() if base else [])])
    tensors, changes = plan_repair(
        ckpt,
        family=family,
        base=base,
        bake_tanh=bake_tanh,
        restore_base=restore_base,
        progress=progress,
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
    canonical = _canonical(tensors)
    facts = _facts(canonical, ckpt, base)
    adapter = checkpoint_adapter(ckpt, family=family)
    small = sum(h.nbytes for h in tensors.values()) <= FULL_SCAN_BYTES
    findings = content_findings(canonical, facts, adapter, scan_all=small, tanh_baked=baked)
    if not changes:
        return RepairReport(ckpt.path, None, [], findings)
    if baked and dest.format == "pth":
        # Only safetensors metadata can say the gates are baked; say it here instead.
        changes = [
            replace(c, detail=c.detail + " (a .pth cannot record this: do not bake it again)")
            if c.kind == "bake-tanh"
            else c
            for c in changes
        ]
    # Own memory per tensor: torch.save would otherwise write whole shared storages.
    state = {k: h.to_torch().clone() for k, h in tensors.items()}
    # The input's metadata carried over, then what extract records, for these tensors.
    metadata = dict(ckpt.metadata or {})
    metadata.update({k: str(v) for k, v in (ckpt.args or {}).items() if k.startswith("adapter_")})
    fresh = adapter_metadata(
        state, adapter=adapter, facts=facts, source=ckpt.path.name, transforms=transforms
    )
    metadata.update({k: v for k, v in fresh.items() if v})
    config = peft_config(ckpt, adapter) if family is peft.ADAPTION_PROMPT and adapter else None
    if family is PEFT_LORA and adapter is not None:  # PEFT builds its modules from the config
        config = lora_peft_config(ckpt, adapter)
    layouts.write(dest, family, state, metadata=metadata, peft_config=config)
    size = sum(f.stat().st_size for f in dest.files)
    changes.append(Change("wrote", f"{len(tensors)} tensors, {human_bytes(size)}"))
    return RepairReport(ckpt.path, dest.path, changes, findings)
