"""How an adapter file's tensors go into the reference model's state: strictly (every name
resolved, every missing piece a finding) or as the family's own code loads it.

What the reference model needs per family: LLaMA-Adapter v1 and v2 chat use the model's own
names; PEFT's per-layer prompts [1, L, dim] are stacked into ``adapter_query`` (its adapted
layers are the last ones, as v1's) and its scalar gates are broadcast to every head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from ckpt_doctor import keys, lora_merge
from ckpt_doctor.adapters import AdapterConfig
from ckpt_doctor.errors import ModelLoadError
from ckpt_doctor.facts import ModelFacts
from ckpt_doctor.families import LLAMA_ADAPTER_V1, Family, peft
from ckpt_doctor.families.llama_adapter_v1 import QUERY_KEY, gate_key
from ckpt_doctor.families.llama_adapter_v2 import CHAT, CHAT_LINEAR, LAYER_NORMS
from ckpt_doctor.findings import finding, short_list
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.model import ModelArgs
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.upstream_load import own_load

if TYPE_CHECKING:
    from ckpt_doctor.loading import LoadReport

Shapes = dict[str, tuple[int, ...]]
ToTensor = Callable[..., torch.Tensor]  # (handle, name) -> tensor on the model's device/dtype


def tuning(names: Mapping[str, object] | list[str]) -> tuple[bool, bool]:
    """(bias, scale): whether the file tunes biases / input scales of the linears (v2 chat)."""
    tuned = [n for n in names if re.fullmatch(CHAT_LINEAR, n)]
    return any(n.endswith("_bias") for n in tuned), any(n.endswith("_scale") for n in tuned)


def fp32_names(family: Family | None, expected: Shapes) -> set[str]:
    """Parameters the family's own code keeps in fp32 whatever the model dtype: v2 chat casts
    its trained norms and gates to float (models_llama_adapter.py)."""
    if family is not CHAT:
        return set()
    gates = family.gate.pattern.replace(r"(\d+)", r"\d+") if family.gate else "$^"
    return {n for n in expected if re.fullmatch(LAYER_NORMS, n) or re.fullmatch(gates, n)}


def prompt_rounding(family: Family | None) -> torch.dtype | None:
    """LLaMA-Adapter v2 chat calls .half() on its prompt and on tanh(gate) at inference."""
    return torch.float16 if family is CHAT else None


def apply(
    state: dict[str, torch.Tensor],
    expected: Shapes,
    extra: Checkpoint,
    report: LoadReport,
    tensor: ToTensor,
    *,
    mode: str,
    full: bool,
) -> None:
    """Overlay ``extra`` on the base state: ``mode`` strict or upstream (the family's own)."""
    if mode == "upstream":
        _own_loader(state, expected, extra, report, tensor)
    else:
        _strict(state, expected, extra, report, tensor, full=full)


def _into_model(
    family: Family | None,
    src: dict[str, TensorHandle],
    config: AdapterConfig | None,
    args: ModelArgs,
    tensor: ToTensor,
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, TensorHandle], list[str]]:
    """PEFT's per-layer prompts and scalar gates as the model's adapter_query and per-head
    gates (written into ``state``); returns the remaining tensors and the names it took."""
    if family is not peft.ADAPTION_PROMPT or config is None:
        return src, []
    # Only what the file gave (an own-loader overlay passes the names its loader matched).
    prompts = {i: k for i, k in config.prompt_layers.items() if k in src}
    gates = {i: k for i, k in config.gate_layers.items() if k in src}
    n_layers, n_heads = args.n_layers, args.n_heads
    if prompts and list(prompts) != list(range(n_layers - len(prompts), n_layers)):
        raise ModelLoadError(
            f"{family.name} adapts the last layers, but this file's prompts are for layers "
            f"{short_list([str(i) for i in prompts])}",
            code="ADAPTER_SHAPE",
            hint="pair the adapter with the base it was trained on",
        )
    taken = [*prompts.values(), *gates.values()]
    rest = {k: h for k, h in src.items() if k not in taken}
    if prompts:
        stacked = [tensor(src[prompts[i]]).reshape(-1, src[prompts[i]].shape[-1]) for i in prompts]
        state[QUERY_KEY] = torch.cat(stacked)
    for i, name in gates.items():
        g = tensor(src[name], gate_key(i))
        state[gate_key(i)] = g.reshape(1, 1, 1, 1).expand(1, n_heads, 1, 1).clone()
    return rest, taken


def _own_loader(
    state: dict[str, torch.Tensor],
    expected: Shapes,
    extra: Checkpoint,
    report: LoadReport,
    tensor: ToTensor,
) -> None:
    """The file as its family's own code loads it: only the names it matches, a raise where it
    raises (a flat file where it indexes ['model']), LOAD_NOTHING when nothing matched."""
    family = report.family or LLAMA_ADAPTER_V1
    facts = ModelFacts(dim=report.args.dim, n_layers=report.args.n_layers)
    load = own_load(extra, family=report.family, facts=facts, adapter=report.adapter)
    if load.error is not None:
        raise ModelLoadError(
            f"{family.name}'s own loader ({load.code}) raises on {extra.path}: {load.error}",
            code="LOAD_FAILS",
            hint="save the tensors the way its own code does: ckpt-doctor extract writes that",
        )
    report.unexpected = list(load.unexpected)
    canonical = extra.canonical()
    picked = {keys.canonical_name(n): canonical[keys.canonical_name(n)] for n in load.matched}
    picked, taken = _into_model(report.family, picked, report.adapter, report.args, tensor, state)
    report.from_file += taken
    lora = picked
    picked = lora_merge.split(report, picked)
    for name, handle in picked.items():
        if name == QUERY_KEY and not report.args.adapter_layer:
            continue  # its split is unknown (see _unresolved_adapter): the model runs without it
        if name not in expected:
            continue
        if handle.shape != expected[name]:  # torch raises even with strict=False
            raise ModelLoadError(
                f"load_state_dict(strict=False) raises on {name}: shape {list(handle.shape)} "
                f"in {extra.path}, {list(expected[name])} in the model",
                code=_shape_code(name, report.family),
                hint="upstream would crash here too; repair the file (e.g. broadcast the gate)",
            )
        state[name] = tensor(handle, name)
        report.from_file.append(name)
    lora_merge.merge(state, expected, lora, report)  # after the file's own frozen weights
    if not report.from_file:
        from ckpt_doctor.load_checks import load_nothing

        report.findings.append(load_nothing(extra, load))


def _strict(
    state: dict[str, torch.Tensor],
    expected: Shapes,
    extra: Checkpoint,
    report: LoadReport,
    tensor: ToTensor,
    *,
    full: bool,
) -> None:
    args = report.args
    family: Family | None = report.family
    src, taken = _into_model(family, extra.canonical(), report.adapter, args, tensor, state)
    report.from_file += taken
    lora = src
    src = lora_merge.split(report, src)
    for name, handle in src.items():
        if name not in expected:
            report.unexpected.append(name)
            continue
        if name == QUERY_KEY and not args.adapter_layer:
            continue  # its split is unknown (see _unresolved_adapter): the model runs without it
        shape = expected[name]
        if handle.shape != shape and name.endswith(".gate") and handle.numel == 1:
            state[name] = tensor(handle, name).reshape(1, 1, 1, 1).expand(shape).clone()
            report.from_file.append(name)
            continue
        if handle.shape != shape:
            raise ModelLoadError(
                f"{extra.path}: {name} is {list(handle.shape)}, the model needs {list(shape)}",
                code=_shape_code(name, family),
                hint="pair this file with the base it was trained on",
            )
        state[name] = tensor(handle, name)
        report.from_file.append(name)
    lora_merge.merge(state, expected, lora, report)  # after a full checkpoint's frozen weights
    all_src = extra.canonical()
    _unresolved_adapter(report, all_src)
    _legacy_gates(report, all_src)
    _missing(report, expected, all_src, extra, full=full)


def _legacy_gates(report: LoadReport, src: dict[str, TensorHandle]) -> None:
    scalar = [n for n in report.from_file if n.endswith(".gate") and n in src and src[n].numel == 1]
    if not scalar:
        return
    # Counted over every gate in the file (inspect counts the adapted layers' only).
    gates = [n for n in report.from_file if n.endswith(".gate")]
    report.findings.append(
        finding(
            "GATE_SHAPE",
            f"{len(scalar)} of the file's {len(gates)} gates (every layer's, adapted or "
            f"not) are legacy scalars [1], broadcast to [1, {report.args.n_heads}, 1, 1] for this "
            "run",
            "repair the file so upstream's per-head model can load it",
            layers=[keys.layer_index(n) for n in scalar],
        )
    )


def _required(report: LoadReport, expected: Shapes) -> list[str]:
    """The adapter tensors a strict load needs from the file, by family."""
    family, args = report.family, report.args
    if report.adapter is None:
        return [QUERY_KEY, "layers.N.attention.gate"]
    if report.adapter.lora is not None:
        return []  # lora_merge.missing says which LoRA tensors a strict load lacks
    if family is peft.ADAPTION_PROMPT:
        layers = range(args.n_layers - (report.adapter.adapter_layer or 0), args.n_layers)
        return [f"layers.{i}.attention.adaption_{w}" for i in layers for w in ("prompt", "gate")]
    needed = []
    if family is CHAT:
        needed += [
            n for n in expected if re.fullmatch(CHAT_LINEAR, n) or re.fullmatch(LAYER_NORMS, n)
        ]
        if not report.adapter.has_prompt:
            return needed
    needed += [QUERY_KEY, *(gate_key(i) for i in args.adapted_layers)]
    if not report.adapter.gate_layers and not args.adapter_layer:
        needed.append("layers.N.attention.gate")
    return needed


def _missing(
    report: LoadReport,
    expected: Shapes,
    src: dict[str, TensorHandle],
    extra: Checkpoint,
    *,
    full: bool,
) -> None:
    adapter_missing = [n for n in _required(report, expected) if n not in src]
    adapter_missing += lora_merge.missing(report, src)
    base_missing = [n for n in expected if full and keys.is_base_key(n) and n not in src]
    if base_missing:
        report.findings.append(
            finding(
                "MISSING_TENSORS",
                f"{len(base_missing)} model tensor(s) absent from {extra.path}; the base's were "
                f"used: {short_list(base_missing)}",
                "re-save the full checkpoint, or pass --adapter with the base instead",
                tensors=base_missing,
            )
        )
    if adapter_missing:
        report.findings.append(
            finding(
                "ADAPTER_MISSING",
                f"{extra.path} lacks adapter tensor(s) {short_list(adapter_missing)}: "
                "the model runs without them (at their initial values)",
                "extract the adapter from the training checkpoint again",
                tensors=adapter_missing,
            )
        )
    if report.unexpected:
        report.findings.append(
            finding(
                "UNEXPECTED_KEYS",
                f"{len(report.unexpected)} key(s) in {extra.path} are not model parameters and "
                f"were ignored: {short_list(report.unexpected)}",
                "check the file is a checkpoint of this family for this base",
                tensors=report.unexpected,
            )
        )


def _unresolved_adapter(report: LoadReport, src: dict[str, TensorHandle]) -> None:
    """An adapter whose adapter_len x adapter_layer nothing tells (no args, no trained gate)."""
    config = report.adapter
    if config is None or report.args.adapter_layer or QUERY_KEY not in src:
        return
    gates = [src[k].values() for k in config.gate_layers.values()]
    if gates and not any(g.any() for g in gates):
        report.findings.append(
            finding(
                "ADAPTER_INERT",
                f"every gate in {report.source} is exactly 0: the adapter adds nothing and the "
                "model runs as the base (its prompt split is unknown, so it was left out)",
                "these are zero-init gates: use a trained checkpoint",
            )
        )
    elif gates:
        report.findings.append(
            finding(
                "ADAPTER_SHAPE",
                f"adapter_query.weight {list(src[QUERY_KEY].shape)} in {report.source} does "
                "not split into adapter_len x adapter_layer; the model runs without it",
                "pass the checkpoint with its training args, or the adapter's own base",
            )
        )


def _shape_code(name: str, family: Family | None) -> str:
    if name in keys.VOCAB_KEYS:
        return "VOCAB_MISMATCH"
    if name.endswith(".gate"):
        return "GATE_SHAPE"
    trained = family is not None and family.is_trained(name)
    return "ADAPTER_SHAPE" if trained or not keys.is_base_key(name) else "BASE_MISMATCH"
