"""PEFT LoRA into the reference model: W' = W + scale * (B @ A) for every adapted linear, merged
once at load, so the model (and its fused attention path) runs as it does for a base.

scale is PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, rank_pattern /
alpha_pattern per module (families/peft_lora.Settings). The product is taken in float32 and
added to the weight in float32, then cast to the model's dtype; the merged weight is a new
tensor, never written into the base's file map. A and B are in canonical (Meta) layout: the
reader un-permutes an HF q_proj / k_proj B's rows exactly like the weight's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ckpt_doctor.errors import ModelLoadError
from ckpt_doctor.families import PEFT_LORA
from ckpt_doctor.families.peft_lora import hf_module, linears
from ckpt_doctor.handles import TensorHandle

if TYPE_CHECKING:
    from ckpt_doctor.loading import LoadReport


def split(report: LoadReport, src: dict[str, TensorHandle]) -> dict[str, TensorHandle]:
    """The tensors that are not LoRA's (LoRA's are merged by ``merge`` after the base weights
    are in place: a full checkpoint's frozen weights come first)."""
    if report.family is not PEFT_LORA:
        return src
    return {k: h for k, h in src.items() if not PEFT_LORA.is_trained(k)}


def check_runs(report: LoadReport, path: object) -> None:
    """Refuse a LoRA whose math is not plain W + scale * B @ A (DoRA, ...) or whose scale is
    unknown (no adapter_config.json: lora_alpha is nowhere in the tensors)."""
    lora = report.adapter.lora if report.adapter is not None else None
    if report.family is not PEFT_LORA or lora is None:
        return
    if lora.refusal:
        raise ModelLoadError(
            f"{path}: the reference model does not run this LoRA exactly: {lora.refusal}",
            code="ADAPTER_CONFIG",
            hint="use it with PEFT itself; ckpt-doctor inspect, extract and diff still read it",
        )
    if lora.modules and (lora.settings is None or lora.settings.lora_alpha is None):
        raise ModelLoadError(
            f"{path}: no adapter_config.json with lora_alpha beside it or in the folder above: "
            "the LoRA scale (lora_alpha / r) is not in the tensors",
            code="ADAPTER_CONFIG",
            hint="put the run's adapter_config.json (its output_dir has it) beside the file",
        )


def merge(
    state: dict[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    src: Mapping[str, TensorHandle],
    report: LoadReport,
) -> None:
    """Merge every LoRA pair present in ``src`` into ``state``'s weights (in place of them)."""
    lora = report.adapter.lora if report.adapter is not None else None
    if report.family is not PEFT_LORA or lora is None:
        return
    settings = lora.settings
    for module, m in lora.modules.items():
        if m.a not in src or m.b not in src:
            continue  # incomplete pairs: ADAPTER_MISSING (strict) / not loaded (own loader)
        weight = f"{module}.weight"
        if weight not in expected:
            raise ModelLoadError(
                f"LoRA on {hf_module(module)}, which this base does not have",
                code="ADAPTER_SHAPE",
                hint="pair the adapter with the base it was trained on",
            )
        a, b = src[m.a], src[m.b]
        out, inp = expected[weight]
        if (
            len(a.shape) != 2
            or len(b.shape) != 2
            or a.shape[0] != b.shape[1]
            or (
                b.shape[0],
                a.shape[1],
            )
            != (out, inp)
        ):
            raise ModelLoadError(
                f"LoRA on {hf_module(module)}: A {list(a.shape)} and B {list(b.shape)} do not "
                f"make a [{out}, {inp}] update",
                code="ADAPTER_SHAPE",
                hint="pair the adapter with the base it was trained on",
            )
        rank = settings.rank(module) if settings is not None else None
        if rank is not None and rank != a.shape[0]:
            raise ModelLoadError(
                f"adapter_config.json gives {hf_module(module)} rank {rank}, its tensors rank "
                f"{a.shape[0]}: PEFT builds rank-{rank} modules and its load raises on the sizes",
                code="ADAPTER_CONFIG",
                hint="fix r / rank_pattern in adapter_config.json to match the tensors",
            )
        scale = lora.scale(module)
        if scale is None:  # check_runs refuses this before any weight is read
            raise ModelLoadError(f"no LoRA scale for {module}", code="ADAPTER_CONFIG", hint="")
        w = state[weight]
        with torch.no_grad():
            delta = b.to_torch().to(w.device, torch.float32) @ a.to_torch().to(
                w.device, torch.float32
            )
            state[weight] = (w.float() + scale * delta).to(w.dtype)
        report.from_file += [m.a, m.b]


def missing(report: LoadReport, src: Mapping[str, TensorHandle]) -> list[str]:
    """The LoRA tensors a strict load needs and ``src`` lacks: each incomplete pair's other
    half, and every module adapter_config.json targets that has no tensors."""
    lora = report.adapter.lora if report.adapter is not None else None
    if report.family is not PEFT_LORA or lora is None:
        return []
    need = [
        name or f"{m.name}.lora_{half}.weight"
        for m in lora.modules.values()
        for half, name in (("A", m.a), ("B", m.b))
        if name is None or name not in src
    ]
    settings = lora.settings
    if settings is not None:
        targeted = [m for m in linears(report.args.n_layers) if settings.targets(m)]
        need += [f"{m}.lora_A.weight" for m in targeted if m not in lora.modules]
    return need
