"""``extract``: pull the adapter out of a training checkpoint, for any model size.

Which tensors are the adapter comes from the family's key rules and, with a base, from the diff:
tensors absent from the base, and changed tensors the family trains. Frozen tensors that drifted
are left out and reported (BASE_MODIFIED). Layer range and config come from ``args`` or shapes,
never constants. Output: a flat ``.pth`` with upstream names (what upstream example.py loads)
or ``.safetensors`` with metadata; written atomically, never empty, never over an input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_doctor import __version__
from ckpt_doctor.atomic import check_destination, write_atomically
from ckpt_doctor.base_checks import check_against_base
from ckpt_doctor.checks import content_findings
from ckpt_doctor.diffing import Progress, diff_tensors
from ckpt_doctor.errors import RefusedError, UsageError
from ckpt_doctor.facts import AdapterConfig, ModelFacts, adapter_config, model_facts
from ckpt_doctor.families import detect_family, is_adapter_key, require_runs_here
from ckpt_doctor.findings import Finding, exit_code_for
from ckpt_doctor.handles import TensorHandle, from_torch
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.transforms import Transforms

FORMATS = ("pth", "safetensors")
# The gate function each family's upstream training applies (recorded for inference).
TRAINING_GATE_FN = {"llama-adapter-v1": "tanh"}
# What --dtype may cast the adapter to: floats only (an integer cast truncates gates to 0).
CAST_DTYPES = ("float32", "float16", "bfloat16")


# Metadata flag: the gates hold tanh(g) already (repair --bake-tanh), so raw inference is right.
@dataclass
class Extraction:
    source: Path
    output: Path
    format: str
    taken: dict[str, str]  # name -> why it was taken
    left: list[str]
    adapter: AdapterConfig
    facts: ModelFacts
    metadata: dict[str, str]
    input_bytes: int
    output_bytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "format": self.format,
            "taken": self.taken,
            "left": len(self.left),
            "adapter": self.adapter.to_json(),
            "metadata": self.metadata,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "findings": [f.to_json() for f in self.findings],
        }


def output_format(out: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = "safetensors" if out.suffix == ".safetensors" else "pth"
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint="use --format pth or safetensors")
    # torch.load on safetensors bytes (or safe_open on a pickle) fails: the name must not lie.
    if (fmt == "safetensors") != (out.suffix == ".safetensors"):
        raise UsageError(
            f"--format {fmt} but the output is named {out.name}",
            hint="name a safetensors file *.safetensors and a pth file anything else",
        )
    return fmt


def select_adapter(
    ckpt: Checkpoint, *, base: Checkpoint | None = None, progress: Progress | None = None
) -> tuple[dict[str, str], list[str], list[Finding]]:
    """(taken name -> reason, names left behind, findings about the base)."""
    tensors = ckpt.canonical()
    family = detect_family(tensors)
    # Its own library loads it by its own names (PEFT also wants adapter_config.json): a
    # renamed flat copy would load nowhere.
    require_runs_here(family, ckpt.path, command="extract")
    taken = {n: f"{family.name} key" for n in family.adapter_keys(tensors)} if family else {}
    findings: list[Finding] = []
    if base is not None:
        base_tensors = base.canonical()
        diff = diff_tensors(tensors, base_tensors, progress=progress)
        for t in diff.tensors:
            if t.status == "added" and t.name not in taken:
                taken[t.name] = "absent from the base"
            elif t.status == "modified" and is_adapter_key(t.name) and t.name not in taken:
                taken[t.name] = "changed, trained by the family"
        findings = check_against_base(diff, n_base_keys=len(base_tensors))
    left = [n for n in tensors if n not in taken]
    return taken, left, findings


def tensor_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over sorted (name, dtype, shape, raw bytes) of torch tensors."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_metadata(
    tensors: Mapping[str, Any],
    *,
    adapter: AdapterConfig | None,
    facts: ModelFacts,
    source: str,
    transforms: Transforms | None = None,
) -> dict[str, str]:
    """The safetensors metadata of an adapter file (one definition: extract and repair write
    it). ``tensors`` are the torch tensors written; their digest is what verify checks."""
    family = adapter.family.name if adapter is not None else ""
    transforms = transforms or Transforms()
    metadata = {
        "format": "pt",
        "family": family,
        "adapter_len": str(adapter.adapter_len or "") if adapter is not None else "",
        "adapter_layer": str(adapter.adapter_layer or "") if adapter is not None else "",
        "n_layers": str(facts.n_layers or ""),
        "dim": str(facts.dim or ""),
        "n_heads": str(facts.n_heads or ""),
        # Baked gates already hold tanh(g): raw inference then reproduces tanh training.
        "gate_fn": "raw" if transforms.baked else TRAINING_GATE_FN.get(family, "raw"),
        "source": source,
        "sha256": tensor_digest(tensors),
        "tool": f"ckpt-doctor {__version__}",
    }
    return {**metadata, **transforms.to_metadata()}  # so verify can redo them on the source


def extract(
    ckpt: Checkpoint,
    out: Path,
    *,
    base: Checkpoint | None = None,
    fmt: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Extraction:
    fmt = output_format(out, fmt)
    sources = [*ckpt.inputs(), *(base.inputs() if base else [])]
    check_destination(out, force=force, sources=sources)
    if dtype is not None and dtype not in CAST_DTYPES:
        raise UsageError(
            f"--dtype {dtype!r} cannot hold an adapter",
            hint=f"use one of {', '.join(CAST_DTYPES)}, or leave --dtype out to keep dtypes",
        )
    taken, left, findings = select_adapter(ckpt, base=base, progress=progress)
    tensors = ckpt.canonical()
    adapter = adapter_config(tensors, args=ckpt.args, metadata=ckpt.metadata)
    if not taken or adapter is None:
        raise RefusedError(
            f"{ckpt.path}: no adapter tensors to extract ({len(tensors)} tensors, none an "
            "adapter key" + (" or absent from the base)" if base else ")"),
            code="ADAPTER_MISSING",
            hint="check this is the fine-tuned checkpoint; nothing was written",
        )
    base_facts = model_facts(base.canonical(), params=base.params) if base else None
    facts = model_facts(tensors, params=ckpt.params, fallback=base_facts)
    out_tensors = {name: _materialise(tensors[name], dtype) for name in sorted(taken)}
    # The checks inspect runs, on the values as written (after any cast): a NaN or inert
    # adapter is extracted as asked, but never reported as a clean extraction.
    written = {name: from_torch(name, t) for name, t in out_tensors.items()}
    findings += content_findings(written, facts, adapter)
    metadata = adapter_metadata(
        out_tensors, adapter=adapter, facts=facts, source=ckpt.path.name,
        transforms=Transforms(cast=dtype),
    )  # fmt: skip
    write_atomically(out, lambda tmp: _save(out_tensors, tmp, fmt, metadata))
    return Extraction(
        ckpt.path,
        out,
        fmt,
        {n: taken[n] for n in sorted(taken)},
        left,
        adapter,
        facts,
        metadata,
        input_bytes=sum(f.stat().st_size for f in ckpt.files),
        output_bytes=out.stat().st_size,
        findings=findings,
    )


def _materialise(handle: TensorHandle, dtype: str | None) -> Any:
    """Own contiguous memory per tensor: no storage shared with the file or another tensor."""
    import torch

    t = handle.to_torch().clone()
    if dtype is not None and t.is_floating_point():
        cast = t.to(getattr(torch, dtype))
        # A cast past the target's range turns values into Inf: refuse rather than write it.
        broken = torch.isfinite(t) & ~torch.isfinite(cast)
        if broken.any():
            worst = float(t[broken].abs().max())
            limit = torch.finfo(cast.dtype).max
            raise RefusedError(
                f"{handle.name}: casting to {dtype} turns {int(broken.sum())} finite value(s) "
                f"into Inf (max |x| = {worst:.6g}; {dtype} holds up to {limit:.6g})",
                code="FP16_OVERFLOW" if dtype == "float16" else "NONFINITE",
                hint="keep the source dtype (leave --dtype out) or cast to a wider dtype "
                "(bfloat16, float32); nothing was written",
            )
        t = cast
    return t.contiguous()


def _save(tensors: dict[str, Any], path: Path, fmt: str, metadata: dict[str, str]) -> None:
    import torch

    if fmt == "safetensors":
        from ckpt_doctor.safetensors_format import save as save_file  # in place: see there

        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
