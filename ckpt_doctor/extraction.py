"""``extract``: pull the adapter out of a training checkpoint, for any model size and family.

Which tensors are the adapter comes from the family's data: every tensor it trains (v1's prompt
and gates; v2's biases, scales and norms too; PEFT's adaption tensors). With a base, the diff
adds the findings: frozen tensors that drifted are left out and reported (BASE_MODIFIED), as
are tensors absent from the base that the family does not train (CLIP's, say). Layer range and
config come from ``args``, adapter_config.json or shapes, never constants. The output has the
family's own names and layout (layouts.py); written atomically, never empty, never over an
input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_doctor import __version__, keys, layouts
from ckpt_doctor.adapters import AdapterConfig, checkpoint_adapter, checkpoint_family
from ckpt_doctor.base_checks import check_against_base
from ckpt_doctor.checks import content_findings
from ckpt_doctor.choices import canonical_dtype
from ckpt_doctor.diffing import Progress, diff_tensors
from ckpt_doctor.errors import RefusedError, UsageError
from ckpt_doctor.facts import ModelFacts, model_facts
from ckpt_doctor.families import PEFT_LORA, UNKNOWN, Family, peft, peft_lora, require_runs_here
from ckpt_doctor.findings import Finding, exit_code_for
from ckpt_doctor.handles import TensorHandle, from_torch
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.transforms import Transforms

FORMATS = layouts.FORMATS
# What --dtype may cast the adapter to: floats only (an integer cast truncates gates to 0).
CAST_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Extraction:
    source: Path
    output: Path
    format: str
    taken: dict[str, str]  # name as written -> why it was taken
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
    """The format of a flat adapter file named ``out`` (repair's output, v1 layout)."""
    return layouts.destination(out, None, fmt).format


def select_adapter(
    ckpt: Checkpoint,
    *,
    family: Family | None,
    base: Checkpoint | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, str], list[str], list[Finding]]:
    """(canonical name -> why taken, names left behind, findings about the base)."""
    tensors = ckpt.canonical()
    why = f"trained by {family.name}" if family is not None else ""
    taken = {n: why for n in family.trained_keys(tensors)} if family is not None else {}
    findings: list[Finding] = []
    if base is not None:
        base_tensors = base.canonical()
        diff = diff_tensors(tensors, base_tensors, family=family, progress=progress)
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
    gate = adapter.family.gate if adapter is not None else None
    transforms = transforms or Transforms()
    metadata = {
        "format": "pt",
        "family": family,
        "adapter_len": str(adapter.adapter_len or "") if adapter is not None else "",
        "adapter_layer": str(adapter.adapter_layer or "") if adapter is not None else "",
        "n_layers": str(facts.n_layers or ""),
        "dim": str(facts.dim or ""),
        "n_heads": str(facts.n_heads or ""),
        # The gate function training applied (baked gates already hold tanh(g): raw
        # inference then reproduces tanh training).
        "gate_fn": "raw" if transforms.baked or gate is None else gate.trained,
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
    family = checkpoint_family(ckpt.borrow_params(base))
    if family is UNKNOWN:  # which tensors are the adapter is exactly what is unknown
        require_runs_here(family, ckpt.path, command="extract")
    dest = layouts.destination(out, family, fmt)
    layouts.check(dest, force=force, sources=[*ckpt.inputs(), *(base.inputs() if base else [])])
    dtype = None if dtype is None else canonical_dtype(dtype)  # bf16, fp16, half, fp32
    if dtype is not None and dtype not in CAST_DTYPES:
        raise UsageError(
            f"--dtype {dtype!r} cannot hold an adapter",
            hint=f"use one of {', '.join(CAST_DTYPES)}, or leave --dtype out to keep dtypes",
        )
    taken, left, findings = select_adapter(ckpt, family=family, base=base, progress=progress)
    tensors = ckpt.canonical()
    adapter = checkpoint_adapter(ckpt, family=family)
    if not taken or adapter is None:
        raise RefusedError(
            f"{ckpt.path}: no adapter tensors to extract ({len(tensors)} tensors, none trained "
            "by a known adapter family)",
            code="ADAPTER_MISSING",
            hint="check this is the fine-tuned checkpoint; nothing was written",
        )
    base_facts = model_facts(base.canonical(), params=base.params) if base else None
    facts = model_facts(tensors, params=ckpt.params, fallback=base_facts)
    config = lora_peft_config(ckpt, adapter) if family is PEFT_LORA else None
    own = own_names(ckpt, family)
    # The values as saved: an HF q_proj / k_proj LoRA B keeps HF's row order with its HF name.
    saved = {keys.canonical_name(n): h for n, h in ckpt.tensors.items()}
    out_tensors = {own[n]: _materialise(saved[n], dtype) for n in sorted(taken)}
    # The checks inspect runs, on the values as written (after any cast): a NaN or inert
    # adapter is extracted as asked, but never reported as a clean extraction.
    written = {n: from_torch(n, out_tensors[own[n]]) for n in sorted(taken)}
    findings += content_findings(written, facts, adapter)
    metadata = adapter_metadata(
        out_tensors, adapter=adapter, facts=facts, source=ckpt.path.name,
        transforms=Transforms(cast=dtype),
    )  # fmt: skip
    if family is peft.ADAPTION_PROMPT:
        config = peft_config(ckpt, adapter)
    layouts.write(dest, family, out_tensors, metadata=metadata, peft_config=config)
    return Extraction(
        ckpt.path,
        dest.path,
        dest.format,
        {own[n]: taken[n] for n in sorted(taken)},
        left,
        adapter,
        facts,
        metadata,
        input_bytes=sum(f.stat().st_size for f in ckpt.files),
        output_bytes=sum(f.stat().st_size for f in dest.files),
        findings=findings,
    )


def own_names(ckpt: Checkpoint, family: Family | None) -> dict[str, str]:
    """Canonical name -> the name the family's own code expects (layouts.own_name)."""
    return {(c := keys.canonical_name(n)): layouts.own_name(family, c, n) for n in ckpt.tensors}


def peft_config(ckpt: Checkpoint, adapter: AdapterConfig) -> dict[str, object]:
    """adapter_config.json for an extracted PEFT adaption prompt: the source's own config
    where there is one (a Trainer checkpoint dir, an adapter dir), with the counts the tensors
    have; PEFT builds its modules from this file."""
    found = getattr(ckpt, "adapter_json", None) or {}
    config: dict[str, object] = {
        "peft_type": peft.PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "target_modules": "self_attn",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **{k: v for k, v in found.items() if k not in ("adapter_len", "adapter_layers")},
    }
    config["adapter_len"] = adapter.adapter_len
    config["adapter_layers"] = adapter.adapter_layer
    return config


def lora_peft_config(ckpt: Checkpoint, adapter: AdapterConfig) -> dict[str, Any]:
    """adapter_config.json for an extracted LoRA: the run's own config (beside the file, or in
    the output_dir above checkpoint-N/), with target_modules as the tensors have them; refused
    where the tensors alone cannot say what PEFT computes (no lora_alpha, another rank, a
    variant the reference model does not check)."""
    lora = adapter.lora
    settings = lora.settings if lora is not None else None
    if lora is None or lora.refusal:
        raise RefusedError(
            f"{ckpt.path}: ckpt-doctor does not extract this LoRA: {lora.refusal if lora else ''}",
            code="ADAPTER_CONFIG",
            hint="use PEFT's own save_pretrained for this variant; nothing was written",
        )
    if settings is None or settings.lora_alpha is None:
        raise RefusedError(
            f"{ckpt.path}: no LoRA adapter_config.json beside it or in the folder above, and "
            "lora_alpha (the scale) is not in the tensors",
            code="ADAPTER_CONFIG",
            hint="copy the run's adapter_config.json (its output_dir has one, even when "
            "adapter_model.bin is empty) beside the checkpoint; nothing was written",
        )
    wrong = [m for m in lora.modules.values() if settings.rank(m.name) not in (None, m.rank)]
    if wrong:
        m = wrong[0]
        raise RefusedError(
            f"{ckpt.path}: adapter_config.json gives {peft_lora.hf_module(m.name)} rank "
            f"{settings.rank(m.name)}, its tensors rank {m.rank}; the scale is ambiguous",
            code="ADAPTER_CONFIG",
            hint="pass the adapter_config.json of the run these tensors come from",
        )
    config = {**(lora.config or {}), "peft_type": peft_lora.PEFT_TYPE, "inference_mode": True}
    config.setdefault("task_type", "CAUSAL_LM")
    present = list(lora.modules)
    if any(settings.targets(m) != (m in lora.modules) for m in _all_linears(present)):
        # Name exactly the modules that have tensors: PEFT then builds those and no others.
        config["target_modules"] = sorted(peft_lora.hf_module(m) for m in present)
        config["layers_to_transform"] = None
        config["exclude_modules"] = None
    return config


def _all_linears(present: list[str]) -> list[str]:
    layers = [i for m in present if (i := keys.layer_index(m + ".weight")) is not None]
    return peft_lora.linears(max(layers) + 1 if layers else 0)


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
