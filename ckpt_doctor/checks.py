"""Static checks of a checkpoint's contents (docs/findings.md): EMPTY, NONFINITE,
FP16_OVERFLOW, OPTIMIZER_STATE, and content_findings, the checks extract / verify / repair run
on what they write.

None of these generate text or load the model; each returns a list of findings with evidence
(names, numbers) and a hint that says what to do. The adapter's own checks are in
adapter_checks.py, how the file loads in load_checks.py.
"""

from __future__ import annotations

from collections.abc import Mapping

from ckpt_doctor.adapter_checks import check_gates
from ckpt_doctor.adapters import AdapterConfig
from ckpt_doctor.facts import ModelFacts
from ckpt_doctor.findings import Finding, finding, short_list
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.numerics import FP16_MAX, ValueScan, scan_values
from ckpt_doctor.reader import Checkpoint

# What wrote each format, for the EMPTY hint.
_SAVER = {"safetensors": "safetensors' save_file", "hf-sharded": "save_pretrained"}


def check_empty(ckpt: Checkpoint) -> list[Finding]:
    from ckpt_doctor.lora_checks import empty_adapter, is_peft_adapter

    if not ckpt.tensors and is_peft_adapter(ckpt):  # the alpaca-lora save bug
        return [empty_adapter(ckpt)]
    if not ckpt.tensors:
        held = short_list(ckpt.top_level_keys) or "nothing"
        saver = _SAVER.get(ckpt.format, "torch.save")
        return [
            finding(
                "EMPTY",
                f"no tensors found (top-level entries: {held})",
                f"the save wrote no weights: check what was passed to {saver}",
            )
        ]
    zero = [n for n, h in ckpt.tensors.items() if h.numel == 0]
    if zero:
        return [
            finding(
                "EMPTY",
                f"{len(zero)} tensor(s) have zero elements: {short_list(zero)}",
                "these tensors were saved before being allocated; re-save from a loaded model",
                tensors=zero,
            )
        ]
    return []


def check_values(scans: Mapping[str, ValueScan]) -> list[Finding]:
    out = []
    bad = [n for n, s in scans.items() if s.nonfinite]
    if bad:
        total = sum(scans[n].nonfinite for n in bad)
        nans = sum(scans[n].nan for n in bad)
        out.append(
            finding(
                "NONFINITE",
                f"{total} non-finite values ({nans} NaN, {total - nans} Inf) in {len(bad)} "
                f"tensor(s): {short_list(bad)}",
                "training diverged before this save: use an earlier checkpoint, or lower the "
                "learning rate / enable loss scaling and retrain",
                tensors=bad,
                count=total,
            )
        )
    big = [n for n, s in scans.items() if s.beyond_fp16]
    if big:
        worst = max(scans[n].max_abs for n in big)
        out.append(
            finding(
                "FP16_OVERFLOW",
                f"{sum(scans[n].beyond_fp16 for n in big)} finite values beyond the fp16 range "
                f"(±{FP16_MAX:g}) in {short_list(big)}; max |x| = {worst:.4g}; fp16 inference "
                "turns them into Inf",
                "run inference in bfloat16 or float32, or clamp/re-train these tensors",
                tensors=big,
                max_abs=worst,
            )
        )
    return out


def check_optimizer(ckpt: Checkpoint) -> list[Finding]:
    out = []
    for key, entry in ckpt.entries.items():
        if entry.kind != "optimizer":
            continue
        out.append(
            finding(
                "OPTIMIZER_STATE",
                f"'{key}' carries {entry.summary}",
                "inference does not need it: extracting the adapter drops these bytes",
                bytes=entry.tensor_bytes,
                settings={k: repr(v) for k, v in (entry.value or {}).items()},
            )
        )
    return out


def content_findings(
    tensors: Mapping[str, TensorHandle],
    facts: ModelFacts,
    adapter: AdapterConfig | None,
    *,
    scan_all: bool = True,
    tanh_baked: bool = False,
) -> list[Finding]:
    """NONFINITE / FP16_OVERFLOW over the values and the gate checks over the adapted layers'
    gates: what inspect checks, run on the tensors extract takes, verify verifies or repair
    writes. ``scan_all=False`` scans only the adapter's values (multi-GB full checkpoints)."""
    scans = {
        n: scan_values(h)
        for n, h in tensors.items()
        if h.is_float and (scan_all or (adapter is not None and adapter.family.is_trained(n)))
    }
    layers = adapter.gate_layers.items() if adapter is not None else ()
    gates = {i: tensors[k].values() for i, k in layers if k in tensors}
    adapted = adapter.adapted_layers(facts.n_layers) if adapter is not None else []
    family = adapter.family if adapter is not None else None
    gate_findings = check_gates(gates, facts, adapted, family=family, tanh_baked=tanh_baked)
    if adapter is not None and adapter.lora is not None:  # LoRA has no gate: B all zero
        from ckpt_doctor.lora_checks import inert, zero_b

        zero = zero_b(tensors, adapter)
        if zero and len(zero) == sum(1 for m in adapter.lora.modules.values() if m.b):
            gate_findings.append(inert(f"{len(zero)} LoRA B matrices", zero))
    return [*check_values(scans), *gate_findings]
