"""Static checks: pure functions from checkpoint facts to findings (docs/findings.md).

None of these generate text or load the model; each returns a list of findings with evidence
(names, numbers) and a hint that says what to do.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

import numpy as np

from ckpt_doctor import keys
from ckpt_doctor.facts import AdapterConfig, ModelFacts
from ckpt_doctor.families import (
    TANH_MISMATCH_RATIO,
    V1_QUERY_KEY,
    AdapterFamily,
    is_adapter_key,
    raw_over_tanh,
    v1_gate_key,
)
from ckpt_doctor.findings import Finding, finding
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.numerics import FP16_MAX, ValueScan, scan_values
from ckpt_doctor.reader import Checkpoint


def short_list(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more: what a finding message shows."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def model_key_names(facts: ModelFacts, adapter: AdapterConfig | None) -> set[str]:
    """The names upstream's LLaMA-Adapter model has: base keys, adapter_query, every gate."""
    n_layers = facts.n_layers or 0
    names = set(keys.base_key_names(n_layers))
    names.add(V1_QUERY_KEY)
    names.update(v1_gate_key(i) for i in range(n_layers))
    if adapter is not None:
        names.update(adapter.gate_layers.values())
    return names


# What wrote each format, for the EMPTY hint.
_SAVER = {"safetensors": "safetensors' save_file", "hf-sharded": "save_pretrained"}


def check_empty(ckpt: Checkpoint) -> list[Finding]:
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


def check_container(ckpt: Checkpoint) -> list[Finding]:
    if not ckpt.container_path:
        return []
    where = ckpt.container_subscripts
    others = [f"{k} ({e.summary})" for k, e in ckpt.entries.items()]
    return [
        finding(
            "CONTAINER_NESTED",
            f"weights are nested under checkpoint{where}; other entries: "
            + (", ".join(others) or "none"),
            f"load checkpoint{where}, not the whole file, or extract the adapter tensors "
            "into a flat file",
            container_path=list(ckpt.container_path),
            entries={k: e.summary for k, e in ckpt.entries.items()},
        )
    ]


def check_load_overlap(ckpt: Checkpoint, model_names: set[str]) -> list[Finding]:
    """What upstream's load_state_dict(strict=False) would do with the loaded object."""
    if not ckpt.tensors:
        return []
    seen = list(ckpt.upstream_view())
    if any(k in model_names for k in seen):
        return []
    return [load_nothing(ckpt, model_keys=len(model_names))]


def load_nothing(ckpt: Checkpoint, *, model_keys: int) -> Finding:
    """LOAD_NOTHING, the one message for it: inspect and diagnose predict it from the key
    names, a smoke run with --load-as upstream sees it happen; the same fact, the same error
    (loading the file as upstream does gives the plain base model)."""
    seen = list(ckpt.upstream_view())
    # Say what each number counts: the model's keys vs the file's top-level keys.
    message = (
        f"upstream's load_state_dict(strict=False) takes 0 of the model's {model_keys} keys "
        f"from this file: none of the file's {len(seen)} top-level keys ({short_list(seen)}) "
        "is a model key; "
        + (
            "every adapter gate keeps its zero init and the model runs as the plain base"
            if any(is_adapter_key(n) for n in ckpt.canonical())
            else "the model keeps the weights it had before (for a base: random ones)"
        )
    )
    # A prefix is cured by stripping it; a container by taking the tensors out.
    if ckpt.prefix is not None and not ckpt.container_path:
        hint = f"strip the prefix: ckpt-doctor repair {shlex.quote(str(ckpt.path))} -o fixed.pth"
    else:
        hint = (
            "load the adapter tensors themselves: extract them into a flat file with upstream "
            "names (ckpt-doctor extract), or load the file with --load-as strict"
        )
    return finding(
        "LOAD_NOTHING", message, hint, keys_seen=len(seen), matched=0, model_keys=model_keys
    )


def upstream_load_findings(ckpt: Checkpoint, model_names: set[str]) -> list[Finding]:
    """CONTAINER_NESTED / LOAD_NOTHING / KEY_PREFIX: how upstream example.py's
    ``load_state_dict(torch.load(path), strict=False)`` sees the file as saved."""
    return [
        *check_container(ckpt),
        *check_load_overlap(ckpt, model_names),
        *check_prefix(ckpt, model_names),
    ]


def check_prefix(ckpt: Checkpoint, model_names: set[str]) -> list[Finding]:
    rewrite = ckpt.prefix
    if rewrite is None:
        return []
    names = list(ckpt.tensors)
    before = sum(n in model_names for n in names) / len(names)
    after = sum(keys.strip_prefix(n, rewrite.prefix) in model_names for n in names) / len(names)
    return [
        finding(
            "KEY_PREFIX",
            f"{rewrite.keys_with_prefix} of {rewrite.total_keys} keys carry the prefix "
            f"'{rewrite.prefix}'; overlap with the model's names is {before:.0%} as saved and "
            f"{after:.0%} after stripping it",
            f"strip '{rewrite.prefix}' from the keys before loading "
            f"({{k.removeprefix('{rewrite.prefix}'): v for k, v in sd.items()}})",
            prefix=rewrite.prefix,
            overlap_before=before,
            overlap_after=after,
        )
    ]


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


def adapter_expected(ckpt: Checkpoint) -> bool:
    args = ckpt.args or {}
    return "adapter_len" in args or "adapter_layer" in args


def check_adapter(
    tensors: Mapping[str, TensorHandle],
    adapter: AdapterConfig | None,
    facts: ModelFacts,
    *,
    expected: bool,
) -> list[Finding]:
    """ADAPTER_MISSING / ADAPTER_SHAPE / ADAPTER_CONFIG for LLaMA-Adapter v1."""
    if adapter is None:
        if not expected:
            return []
        return [
            finding(
                "ADAPTER_MISSING",
                "the checkpoint's args describe a LLaMA-Adapter run, but no adapter tensors "
                "(adapter_query.weight, layers.N.attention.gate) are in it",
                "the adapter parameters were not saved: check the save code keeps "
                "requires_grad parameters, or use another checkpoint of the run",
            )
        ]
    out: list[Finding] = []
    if not adapter.family.runs_here:  # a prompt and a gate per adapted layer
        return _per_layer_pairs(tensors, adapter)
    query = tensors.get(V1_QUERY_KEY)
    if query is None or not adapter.gate_layers:
        part = "adapter_query.weight" if query is None else "every layers.N.attention.gate"
        out.append(
            finding(
                "ADAPTER_MISSING",
                f"adapter tensors found ({short_list(list(adapter.keys))}) but {part} is missing",
                "the adapter is incomplete: re-extract it from the training checkpoint",
            )
        )
    if query is not None:
        shape = tuple(query.shape)
        problems = []
        if len(shape) != 2:
            problems.append(f"it is {len(shape)}-D, expected 2-D [adapter_layer*adapter_len, dim]")
        elif facts.dim and shape[1] != facts.dim:
            problems.append(f"its width {shape[1]} != model dim {facts.dim}")
        elif adapter.adapter_len is None and adapter.layer_candidates:
            # Without any candidate (no args, every gate still zero) nothing says the rows
            # are wrong: the layer count is just unknown.
            tried = " or ".join(str(n) for n in adapter.layer_candidates)
            problems.append(
                f"its {shape[0]} rows do not split into adapter_len x adapter_layer "
                f"with adapter_layer={tried}"
            )
        if facts.n_layers and adapter.adapter_layer and adapter.adapter_layer > facts.n_layers:
            problems.append(
                f"adapter_layer {adapter.adapter_layer} > the model's {facts.n_layers} layers"
            )
        if problems:
            out.append(
                finding(
                    "ADAPTER_SHAPE",
                    f"adapter_query.weight {list(shape)}: " + "; ".join(problems),
                    "this adapter was trained for a different model or config: pair it with "
                    "the base it was trained on",
                    shape=list(shape),
                )
            )
    if adapter.args_len and adapter.args_layer and adapter.source != "args":
        rows = adapter.query_shape[0] if adapter.query_shape else None
        out.append(
            finding(
                "ADAPTER_CONFIG",
                f"args say adapter_len={adapter.args_len} x adapter_layer={adapter.args_layer} "
                f"= {adapter.args_len * adapter.args_layer} prompt rows, but adapter_query.weight "
                f"has {rows}; the tensor shapes win"
                + (
                    f" (adapter_len={adapter.adapter_len}, adapter_layer={adapter.adapter_layer})"
                    if adapter.adapter_len
                    else ""
                ),
                "pass the config the tensors were trained with; args may come from another run",
                args={"adapter_len": adapter.args_len, "adapter_layer": adapter.args_layer},
                rows=rows,
            )
        )
    return out


def _per_layer_pairs(tensors: Mapping[str, TensorHandle], adapter: AdapterConfig) -> list[Finding]:
    """ADAPTER_MISSING for families with a prompt and a gate per layer: a half-saved layer."""
    prompts = set(adapter.family.prompt_layers(tensors))
    lonely = sorted(prompts ^ set(adapter.gate_layers))
    if not lonely:
        return []
    return [
        finding(
            "ADAPTER_MISSING",
            f"{adapter.family.name}: layers {short_list([str(i) for i in lonely])} have a prompt "
            "without a gate or a gate without a prompt",
            "the adapter is incomplete: save it again from the trained model",
            layers=lonely,
        )
    ]


def check_gates(
    gate_values: Mapping[int, np.ndarray],
    facts: ModelFacts,
    adapted: Sequence[int],
    *,
    family: AdapterFamily | None,
    tanh_baked: bool = False,
) -> list[Finding]:
    """GATE_SHAPE / ADAPTER_INERT / GATE_TANH_MISMATCH over the adapted layers' gates.

    ``tanh_baked``: the gates already hold tanh(g) (repair --bake-tanh), so raw inference is
    what training did and the raw-vs-tanh comparison does not apply. For a family the
    reference model does not run (PEFT, litgpt) only ADAPTER_INERT applies: their gates have
    their own shapes and are raw in training and inference alike."""
    out: list[Finding] = []
    used = {i: g for i, g in gate_values.items() if i in adapted} or dict(gate_values)
    if not used:
        return out
    if family is not None and not family.runs_here:
        return _inert(used, "layers with a gate")
    scalar = [i for i, g in used.items() if g.size == 1]
    heads = facts.n_heads
    wrong = [
        i for i, g in used.items() if g.size != 1 and heads and tuple(g.shape) != (1, heads, 1, 1)
    ]
    # Which gates are counted: the adapted layers' (or every gate when those are unknown).
    scope = "adapted layers'" if set(used) <= set(adapted) else "file's"
    if scalar:
        out.append(
            finding(
                "GATE_SHAPE",
                f"{len(scalar)} of the {len(used)} {scope} gates are legacy scalars of shape [1] "
                f"(layers {short_list([str(i) for i in scalar])}); "
                f"the model has per-head gates [1, {heads or 'n_heads'}, 1, 1] and "
                "load_state_dict raises on the size mismatch",
                "broadcast each scalar gate to every head (repairable without retraining)",
                layers=scalar,
                repairable=True,
            )
        )
    if wrong:
        shapes = sorted({str(list(used[i].shape)) for i in wrong})
        out.append(
            finding(
                "GATE_SHAPE",
                f"gate shape(s) {', '.join(shapes)} do not fit a model with {heads} heads "
                f"(expected [1, {heads}, 1, 1])",
                "this adapter was trained for a model with another head count: use its own base",
                layers=wrong,
                repairable=False,
            )
        )
    out += _inert(used, "adapted layers" if scope == "adapted layers'" else "layers with a gate")
    worst_ratio, worst_at = 1.0, None
    for i, g in used.items():
        for h, v in enumerate(g.reshape(-1).tolist()):
            r = raw_over_tanh(v)
            if r > worst_ratio:
                worst_ratio, worst_at = r, (i, h, v)
    if worst_at is not None and worst_ratio > TANH_MISMATCH_RATIO and not tanh_baked:
        layer, head, value = worst_at
        times = f"{worst_ratio:.2f}x" if np.isfinite(worst_ratio) else "an infinite multiple of"
        out.append(
            finding(
                "GATE_TANH_MISMATCH",
                f"gate layer {layer} head {head} = {value:.4g}: raw-gate inference weights the "
                f"adapter {times} what tanh-gate training did (upstream issue #39; "
                f"threshold {TANH_MISMATCH_RATIO}x)",
                "run inference with --gate tanh (as training did), or bake tanh into the gates",
                layer=layer,
                head=head,
                ratio=worst_ratio,
            )
        )
    return out


def _inert(used: Mapping[int, np.ndarray], which: str) -> list[Finding]:
    values = np.concatenate([g.reshape(-1) for g in used.values()])
    if not values.size or values.any():
        return []
    return [
        finding(
            "ADAPTER_INERT",
            f"all {values.size} gate values of the {len(used)} {which} are exactly 0: the "
            "adapter adds nothing and the output equals the base model",
            "these are the zero-init gates: the checkpoint was saved before training "
            "updated them, or the adapter was not loaded; use a trained checkpoint",
            layers=list(used),
        )
    ]


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
        if h.is_float and (scan_all or is_adapter_key(n))
    }
    layers = adapter.gate_layers.items() if adapter is not None else ()
    gates = {i: tensors[k].values() for i, k in layers if k in tensors}
    adapted = adapter.adapted_layers(facts.n_layers) if adapter is not None else []
    family = adapter.family if adapter is not None else None
    gate_findings = check_gates(gates, facts, adapted, family=family, tanh_baked=tanh_baked)
    return [*check_values(scans), *gate_findings]
