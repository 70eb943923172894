"""Static checks of a PEFT LoRA (docs/findings.md): the empty adapter file (EMPTY, with where
the weights usually are), every B still zero (ADAPTER_INERT), A / B shapes that do not fit
the model (ADAPTER_SHAPE) and adapter_config.json against the tensors (ADAPTER_CONFIG).
Whether PEFT's loader matches the names is load_checks' LOAD_NOTHING."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ckpt_doctor.adapters import AdapterConfig
from ckpt_doctor.facts import ModelFacts
from ckpt_doctor.families import peft_lora
from ckpt_doctor.families.peft_lora import hf_module
from ckpt_doctor.findings import Finding, finding, short_list
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.units import human_bytes

CAUSE = (
    "the known cause is alpaca-lora's save: its model.state_dict override returns "
    "get_peft_model_state_dict's output, and save_pretrained filters that again by adapter "
    "name, so no key survives (adapter_model.bin of 443 bytes: an empty dict)"
)


def is_peft_adapter(ckpt: Checkpoint) -> bool:
    """A PEFT adapter file or directory: its own file name, or an adapter_config.json beside."""
    return ckpt.adapter_json is not None or any(
        f.name in peft_lora.WEIGHTS_FILES for f in ckpt.files
    )


def trainer_weights(ckpt: Checkpoint) -> list[Path]:
    """Where a Trainer run keeps the whole model's weights: checkpoint-N/pytorch_model.bin (or
    model.safetensors, sharded) in the adapter's folder, the latest step first."""
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    found = []
    for step in folder.glob("checkpoint-*"):
        names = [step / n for n in peft_lora.TRAINER_WEIGHTS if (step / n).is_file()]
        if names and step.name.removeprefix("checkpoint-").isdigit():
            found.append((int(step.name.removeprefix("checkpoint-")), names[0]))
    return [p for _, p in sorted(found, reverse=True)]


def empty_adapter(ckpt: Checkpoint) -> Finding:
    """EMPTY for a PEFT adapter with no tensors: the save bug, and where the weights are."""
    size = sum(f.stat().st_size for f in ckpt.files)
    name = ckpt.files[0].name if ckpt.files else ckpt.path.name
    found = trainer_weights(ckpt)
    where = (
        f"the trained weights are in {short_list([str(p) for p in found], 3)}"
        if found
        else "the trained weights are usually in the Trainer's checkpoint-N/pytorch_model.bin "
        "or model.safetensors (the whole PeftModel state dict)"
    )
    hint = (
        f"extract the adapter from it: ckpt-doctor extract {found[0]} --base BASE -o adapter"
        if found
        else "extract the adapter from a checkpoint-N/ of the run: ckpt-doctor extract "
        "checkpoint-N/pytorch_model.bin --base BASE -o adapter"
    )
    return finding(
        "EMPTY",
        f"{name} ({human_bytes(size)}, {size} bytes) is a PEFT adapter with no tensors: "
        f"nothing to load, the model runs as the base; {CAUSE}; {where}",
        hint,
        bytes=size,
        weights_at=[str(p) for p in found],
    )


def check_lora(
    tensors: Mapping[str, TensorHandle], adapter: AdapterConfig, facts: ModelFacts
) -> list[Finding]:
    lora = adapter.lora
    if lora is None or not lora.modules:
        return []
    out = _shapes(tensors, adapter, facts)
    out += _config(adapter, facts)
    zero = zero_b(tensors, adapter)
    b_names = [m.b for m in lora.modules.values() if m.b]
    if b_names and len(zero) == len(b_names):
        out.append(inert(f"{len(zero)} LoRA B matrices", zero))
    return out


def zero_b(tensors: Mapping[str, TensorHandle], adapter: AdapterConfig | None) -> list[str]:
    """LoRA B matrices that are exactly zero (their init: that module is unchanged)."""
    if adapter is None or adapter.lora is None:
        return []
    b_names = [m.b for m in adapter.lora.modules.values() if m.b and m.b in tensors]
    return [n for n in b_names if not tensors[n].values().any()]


def inert(which: str, zero: list[str]) -> Finding:
    return finding(
        "ADAPTER_INERT",
        f"all {which} are exactly 0, their zero init: W + scale * B @ A = W, so the adapter "
        "changes nothing and the model runs as the base",
        "the LoRA was saved before training updated it (or B's gradients never flowed): use "
        "a trained checkpoint",
        tensors=zero,
    )


def _shapes(
    tensors: Mapping[str, TensorHandle], adapter: AdapterConfig, facts: ModelFacts
) -> list[Finding]:
    lora = adapter.lora
    if lora is None:
        return []
    problems, lonely = [], []
    for m in lora.modules.values():
        if m.a is None or m.b is None:
            lonely.append(m.name)
            continue
        a, b = tensors[m.a].shape, tensors[m.b].shape
        want = _linear_shape(m.name, facts)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"{hf_module(m.name)}: A {list(a)} and B {list(b)} disagree on r")
        elif want is not None and (b[0], a[1]) != want:
            problems.append(
                f"{hf_module(m.name)}: B @ A is [{b[0]}, {a[1]}], the model's weight {list(want)}"
            )
    out = []
    if lonely:
        out.append(
            finding(
                "ADAPTER_MISSING",
                f"LoRA modules with only one of A and B: {short_list(lonely)}",
                "the adapter is incomplete: save it again from the trained model",
                modules=lonely,
            )
        )
    if problems:
        out.append(
            finding(
                "ADAPTER_SHAPE",
                f"peft-lora: {'; '.join(problems[:3])}"
                + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
                "this adapter was made for another model: pair it with the base it was trained on",
            )
        )
    return out


def _linear_shape(module: str, facts: ModelFacts) -> tuple[int, int] | None:
    dim, hidden, vocab = facts.dim, facts.ffn_hidden, facts.vocab_size
    if module == "output":
        return (vocab, dim) if vocab and dim else None
    if re.search(r"attention\.w[qkvo]$", module):
        return (dim, dim) if dim else None
    if not dim or not hidden:
        return None
    return (dim, hidden) if module.endswith("w2") else (hidden, dim)


def _config(adapter: AdapterConfig, facts: ModelFacts) -> list[Finding]:
    """adapter_config.json against the tensors: PEFT builds its modules from the config, so a
    rank it disagrees with makes its load raise, a module it targets without tensors keeps
    B = 0, and tensors on a module it does not target are ignored."""
    lora = adapter.lora
    if lora is None:
        return []
    settings = lora.settings
    if settings is None:
        return [
            finding(
                "ADAPTER_CONFIG",
                f"no LoRA adapter_config.json beside the file or in the folder above: "
                f"lora_alpha (the scale, lora_alpha / r) is unknown for its "
                f"{len(lora.modules)} modules",
                "put the run's adapter_config.json (its output_dir has one) beside the file; "
                "extract and smoke-generate need it",
            )
        ]
    out = []
    ranks = [
        f"{hf_module(m.name)} r={settings.rank(m.name)} in the config, {m.rank} in the tensors"
        for m in lora.modules.values()
        if m.rank and settings.rank(m.name) not in (None, m.rank)
    ]
    if ranks:
        out.append(
            finding(
                "ADAPTER_CONFIG",
                f"{len(ranks)} LoRA module(s) disagree with adapter_config.json on the rank: "
                f"{short_list(ranks, 2)}; PEFT builds its modules from the config and its load "
                "raises on the size mismatch",
                "fix r / rank_pattern in adapter_config.json to match the tensors (or use the "
                "config of the run they come from)",
                modules=len(ranks),
            )
        )
    layers = facts.n_layers or 1 + max(
        (i for m in lora.modules if (i := _layer(m)) is not None), default=-1
    )
    targeted = {m for m in peft_lora.linears(layers) if settings.targets(m)}
    untargeted = sorted(set(lora.modules) - targeted, key=_layer_key)
    absent = sorted(targeted - set(lora.modules), key=_layer_key)
    parts = []
    if untargeted:
        parts.append(
            f"tensors for {len(untargeted)} module(s) it does not target, which PEFT's load "
            f"ignores ({short_list([hf_module(m) for m in untargeted], 3)})"
        )
    if absent:
        parts.append(
            f"no tensors for {len(absent)} module(s) it targets, which keep B = 0 "
            f"({short_list([hf_module(m) for m in absent], 3)})"
        )
    if parts:
        out.append(
            finding(
                "ADAPTER_CONFIG",
                f"adapter_config.json's target_modules {settings.target_modules!r} and the "
                f"tensors disagree: {'; '.join(parts)}",
                "use the adapter_config.json of the run the tensors come from; ckpt-doctor "
                "extract writes target_modules as the tensors have them",
                untargeted=untargeted,
                absent=absent,
            )
        )
    return out


def _layer(module: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _layer_key(module: str) -> tuple[int, str]:
    layer = _layer(module)
    return (layer if layer is not None else 10**9, module)
