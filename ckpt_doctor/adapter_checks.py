"""Static checks of the adapter itself, by its family's rules: ADAPTER_MISSING, ADAPTER_SHAPE,
ADAPTER_CONFIG, ADAPTER_UNKNOWN, GATE_SHAPE, ADAPTER_INERT, GATE_TANH_MISMATCH.

Pure functions from tensor metadata (and the gates' few values) to findings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckpt_doctor.adapters import AdapterConfig
from ckpt_doctor.facts import ModelFacts
from ckpt_doctor.families import TANH_MISMATCH_RATIO, UNKNOWN, Family, raw_over_tanh
from ckpt_doctor.families.llama_adapter_v1 import QUERY_KEY
from ckpt_doctor.findings import Finding, finding, short_list
from ckpt_doctor.handles import TensorHandle


def adapter_expected(args: Mapping[str, Any] | None) -> bool:
    """Training args that describe an adapter run (the adapter must then be in the file)."""
    return bool(args) and ("adapter_len" in args or "adapter_layer" in args)


def check_adapter(
    tensors: Mapping[str, TensorHandle],
    adapter: AdapterConfig | None,
    facts: ModelFacts,
    *,
    expected: bool,
) -> list[Finding]:
    """Is the adapter whole, and does it fit the model? By its family's layout."""
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
    if adapter.family is UNKNOWN:
        names = list(adapter.keys)
        return [
            finding(
                "ADAPTER_UNKNOWN",
                f"{len(names)} tensor(s) are neither base weights nor any adapter family "
                f"ckpt-doctor knows: {short_list(names)}",
                "ckpt-doctor reads LLaMA-Adapter v1/v2, PEFT adaption prompt, litgpt and "
                "lit-llama adapters; commands that need the family refuse this file",
                tensors=names,
            )
        ]
    if adapter.lora is not None:
        from ckpt_doctor.lora_checks import check_lora

        return check_lora(tensors, adapter, facts)
    if adapter.family.prompt is not None and adapter.family.prompt.per_layer:
        return _per_layer(tensors, adapter, facts)
    return _stacked(tensors, adapter, facts)


def _stacked(
    tensors: Mapping[str, TensorHandle], adapter: AdapterConfig, facts: ModelFacts
) -> list[Finding]:
    """One prompt adapter_query [adapter_layer * adapter_len, dim] and per-layer gates."""
    out: list[Finding] = []
    query = tensors.get(QUERY_KEY)
    if adapter.family.name == "llama-adapter-v2-chat" and query is None and not adapter.gate_layers:
        return out  # bias-scale-norm tuning without prompts: nothing of a prompt to check
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


def _per_layer(
    tensors: Mapping[str, TensorHandle], adapter: AdapterConfig, facts: ModelFacts
) -> list[Finding]:
    """A prompt and a gate per adapted layer (PEFT, litgpt, lit-llama)."""
    family = adapter.family
    out: list[Finding] = []
    prompts = set(adapter.prompt_layers)
    lonely = sorted(prompts ^ set(adapter.gate_layers))
    if lonely:
        out.append(
            finding(
                "ADAPTER_MISSING",
                f"{family.name}: layers {short_list([str(i) for i in lonely])} have a prompt "
                "without a gate or a gate without a prompt",
                "the adapter is incomplete: save it again from the trained model",
                layers=lonely,
            )
        )
    problems = []
    widths = {tensors[k].shape[-1] for k in adapter.prompt_layers.values() if tensors[k].shape}
    if facts.dim and widths - {facts.dim}:
        problems.append(f"prompt width {sorted(widths)} != model dim {facts.dim}")
    if adapter.query_shape is None and prompts:
        shapes = sorted({str(list(tensors[k].shape)) for k in adapter.prompt_layers.values()})
        problems.append(f"the layers' prompts differ in shape ({', '.join(shapes)})")
    top = facts.n_layers
    if (
        family.adapted == "last"
        and top
        and prompts
        and sorted(prompts) != list(range(top - len(prompts), top))
    ):
        problems.append(
            f"{family.name} adapts the last {len(prompts)} of {top} layers, but the prompts are "
            f"for layers {short_list([str(i) for i in sorted(prompts)])}"
        )
    if problems:
        out.append(
            finding(
                "ADAPTER_SHAPE",
                f"{family.name}: " + "; ".join(problems),
                "this adapter was made for another model: pair it with the base it was trained on",
            )
        )
    said = {"adapter_len": adapter.args_len, "adapter_layers": adapter.args_layer}
    found = {"adapter_len": adapter.adapter_len, "adapter_layers": adapter.adapter_layer}
    differ = [
        k for k in said if said[k] is not None and found[k] is not None and said[k] != found[k]
    ]
    if differ:
        out.append(
            finding(
                "ADAPTER_CONFIG",
                "its config says "
                + ", ".join(f"{k}={said[k]}" for k in differ)
                + ", the tensors have "
                + ", ".join(f"{k}={found[k]}" for k in differ),
                "its library builds the model from the config: fix adapter_config.json to match "
                "the tensors (or re-save the adapter)",
                config=said,
                tensors=found,
            )
        )
    return out


_GATE_SHAPES = {"heads": "[1, {h}, 1, 1]", "scalar": "[1]", "heads-last": "[1, 1, {h}, 1]"}


def _fits(family: Family, shape: tuple[int, ...], heads: int | None) -> bool | None:
    """True when a gate of ``shape`` fits; None for a scalar a per-head family can broadcast."""
    kind = family.gate.shape if family.gate else "heads"
    size = int(np.prod(shape)) if shape else 1
    if kind == "scalar":
        return size == 1
    if size == 1:
        return None
    if not heads:
        return True
    if kind == "heads-last":  # litgpt also accepts (and permutes) the older [1, H, 1, 1]
        return tuple(shape) in ((1, 1, heads, 1), (1, heads, 1, 1))
    return tuple(shape) == (1, heads, 1, 1)


def check_gates(
    gate_values: Mapping[int, np.ndarray],
    facts: ModelFacts,
    adapted: Sequence[int],
    *,
    family: Family | None,
    tanh_baked: bool = False,
) -> list[Finding]:
    """GATE_SHAPE / ADAPTER_INERT / GATE_TANH_MISMATCH over the adapted layers' gates, each
    family's shape and gate function.

    ``tanh_baked``: the gates already hold tanh(g) (repair --bake-tanh), so raw inference is
    what training did and the raw-vs-tanh comparison does not apply. Only a family whose
    training and inference apply different gate functions (LLaMA-Adapter v1) gets that
    comparison at all."""
    out: list[Finding] = []
    used = {i: g for i, g in gate_values.items() if i in adapted} or dict(gate_values)
    if not used or family is None or family.gate is None:
        return out
    heads = facts.n_heads
    verdicts = {i: _fits(family, tuple(g.shape), heads) for i, g in used.items()}
    scalar = [i for i, v in verdicts.items() if v is None]
    wrong = [i for i, v in verdicts.items() if v is False]
    # Which gates are counted: the adapted layers' (or every gate when those are unknown).
    scope = "adapted layers'" if set(used) <= set(adapted) else "file's"
    expected = _GATE_SHAPES[family.gate.shape].format(h=heads or "n_heads")
    if scalar:
        out.append(
            finding(
                "GATE_SHAPE",
                f"{len(scalar)} of the {len(used)} {scope} gates are legacy scalars of shape [1] "
                f"(layers {short_list([str(i) for i in scalar])}); "
                f"the model has per-head gates {expected} and "
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
                f"gate shape(s) {', '.join(shapes)} do not fit {family.name} on a model with "
                f"{heads} heads (expected {expected})",
                "this adapter was trained for a model with another head count: use its own base",
                layers=wrong,
                repairable=False,
            )
        )
    out += _inert(used, "adapted layers" if scope == "adapted layers'" else "layers with a gate")
    if family.gate.switchable and not tanh_baked:
        out += _tanh_mismatch(used)
    return out


def _tanh_mismatch(used: Mapping[int, np.ndarray]) -> list[Finding]:
    worst_ratio, worst_at = 1.0, None
    for i, g in used.items():
        for h, v in enumerate(g.reshape(-1).tolist()):
            r = raw_over_tanh(v)
            if r > worst_ratio:
                worst_ratio, worst_at = r, (i, h, v)
    if worst_at is None or worst_ratio <= TANH_MISMATCH_RATIO:
        return []
    layer, head, value = worst_at
    times = f"{worst_ratio:.2f}x" if np.isfinite(worst_ratio) else "an infinite multiple of"
    return [
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
    ]


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
