"""``convert``: an adapter from one family into another, only where the math is the same.

- LLaMA-Adapter v1 -> PEFT adaption prompt: PEFT is v1's math with one raw gate per layer, so a
  v1 adapter converts when every adapted layer's heads share one gate value (otherwise it is
  refused, with the largest spread). v1's upstream inference uses the gates raw, as PEFT does.
- PEFT adaption prompt -> LLaMA-Adapter v1: always exact: the prompts stacked into
  adapter_query, each scalar gate on every head (v1 keeps a gate per head and layer).
- lit-llama adapter -> LLaMA-Adapter v1: lit-llama runs v1's math with raw per-head gates on
  the layers from adapter_start_layer up (which must be the top layers, contiguous).
Everything else is refused with the reason (litgpt reads other rows of its qkv projection; v2
tunes every linear; a multimodal adapter needs CLIP). Files converted into v1 record that
their gates were trained raw, so nobody applies tanh to them. With --base, the reference model
runs the source and the output and their logits must be identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_doctor import __version__, layouts
from ckpt_doctor.adapters import AdapterConfig, checkpoint_adapter, checkpoint_family
from ckpt_doctor.choices import CONVERT_TARGETS
from ckpt_doctor.errors import RefusedError, UsageError
from ckpt_doctor.extraction import adapter_metadata, peft_config
from ckpt_doctor.facts import ModelFacts, model_facts
from ckpt_doctor.families import (
    LLAMA_ADAPTER_V1,
    UNKNOWN,
    Family,
    family_named,
    litgpt,
    peft,
    require_runs_here,
)
from ckpt_doctor.families.llama_adapter_v1 import QUERY_KEY, gate_key
from ckpt_doctor.findings import Finding, exit_code_for, finding
from ckpt_doctor.reader import Checkpoint, open_checkpoint
from ckpt_doctor.transforms import GATE_TRAINED_KEY

TARGETS = CONVERT_TARGETS
_NOT_CONVERTIBLE = {
    "peft-lora": "LoRA changes the weights of the linears (W + scale * B @ A); no prompt "
    "family computes the same",
    "litgpt": litgpt.LITGPT_ADAPTER.refusal,
    "llama-adapter-v2-chat": "v2 tunes a bias and an input scale on every linear and the norms "
    "besides the prompt; neither LLaMA-Adapter v1 nor PEFT's adaption prompt has them",
    "llama-adapter-v2-multimodal": "its prompts add CLIP image features; no text-only family "
    "computes the same",
}


@dataclass
class Conversion:
    source: Path
    output: Path
    source_family: str
    target_family: str
    tensors: dict[str, list[int]]  # name as written -> shape
    notes: list[str] = field(default_factory=list)
    max_logit_diff: float | None = None  # with --base: source vs output in the reference model
    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "from": self.source_family,
            "to": self.target_family,
            "tensors": self.tensors,
            "notes": self.notes,
            "max_logit_diff": self.max_logit_diff,
            "findings": [f.to_json() for f in self.findings],
        }


def convert(
    ckpt: Checkpoint,
    out: Path,
    *,
    to: str,
    base: Checkpoint | None = None,
    fmt: str | None = None,
    force: bool = False,
) -> Conversion:
    target = family_named(to)
    if target is None or target.name not in TARGETS:
        raise UsageError(f"cannot convert to {to!r}", hint=f"--to one of {', '.join(TARGETS)}")
    family = checkpoint_family(ckpt.borrow_params(base))
    if family is UNKNOWN:
        require_runs_here(family, ckpt.path, command="convert")
    config = checkpoint_adapter(ckpt, family=family)
    if family is None or config is None:
        raise RefusedError(
            f"{ckpt.path} holds no adapter to convert",
            code="ADAPTER_MISSING",
            hint="pass an adapter file or a training checkpoint",
        )
    if family is target:
        raise UsageError(f"{ckpt.path} is a {target.name} adapter already", hint="nothing to do")
    facts = _facts(ckpt, base)
    if family is LLAMA_ADAPTER_V1 and target is peft.ADAPTION_PROMPT:
        tensors, notes = _v1_to_peft(ckpt, config, facts)
    elif target is LLAMA_ADAPTER_V1 and family in (
        peft.ADAPTION_PROMPT,
        litgpt.LIT_LLAMA_ADAPTER,
    ):
        tensors, notes = _per_layer_to_v1(ckpt, family, config, facts)
    else:
        why = _NOT_CONVERTIBLE.get(family.name) or _NOT_CONVERTIBLE.get(family.namespace)
        raise RefusedError(
            f"{family.name} -> {target.name} is not an exact conversion: "
            + (why or f"ckpt-doctor converts {', '.join(TARGETS)} (and lit-llama into v1) only"),
            code="ADAPTER_CONFIG",
            hint="use the adapter with its own library; nothing was written",
        )
    dest = layouts.destination(out, target, fmt)
    layouts.check(dest, force=force, sources=[*ckpt.inputs(), *(base.inputs() if base else [])])
    metadata = _metadata(tensors, ckpt, family, target, config, facts)
    extra = (
        peft_config(ckpt, _target_config(config, target))
        if target is peft.ADAPTION_PROMPT
        else None
    )
    layouts.write(dest, target, tensors, metadata=metadata, peft_config=extra)
    result = Conversion(
        ckpt.path,
        dest.path,
        family.name,
        target.name,
        {n: list(t.shape) for n, t in tensors.items()},
        notes,
    )
    if base is not None and family.runs_here:
        _same_logits(result, ckpt, dest.path, base)
    elif base is None:
        result.notes.append("not run against a base: pass --base to prove equal logits")
    else:
        result.notes.append(
            f"logits not compared: the reference model does not run {family.name} itself "
            "(the conversion maps its math one to one)"
        )
    return result


def _facts(ckpt: Checkpoint, base: Checkpoint | None) -> ModelFacts:
    own = model_facts(ckpt.canonical(), params=ckpt.params)
    if base is None:
        return own
    return model_facts(base.canonical(), params=base.params, fallback=own)


def _v1_to_peft(
    ckpt: Checkpoint, config: AdapterConfig, facts: ModelFacts
) -> tuple[dict[str, Any], list[str]]:
    tensors = ckpt.canonical()
    layers = config.adapted_layers(facts.n_layers)
    if not layers or not config.adapter_len:
        raise RefusedError(
            f"{ckpt.path}: which layers the prompt covers is unknown "
            f"(adapter_len {config.adapter_len}, adapter_layer {config.adapter_layer})",
            code="ADAPTER_SHAPE",
            hint="pass --base (the model's layer count) and the training checkpoint's args",
        )
    prompts = tensors[QUERY_KEY].to_torch().reshape(len(layers), config.adapter_len, -1)
    spreads = {}
    gates = {}
    for i in layers:
        g = tensors[gate_key(i)].values().reshape(-1)
        spreads[i] = float(np.ptp(g)) if g.size else 0.0
        gates[i] = tensors[gate_key(i)].to_torch().reshape(-1)[:1].clone()
    worst = max(spreads, key=spreads.get)
    if spreads[worst] > 0:
        raise RefusedError(
            f"{ckpt.path}: PEFT's adaption prompt has one gate per layer, but layer {worst}'s "
            f"heads have gates from {tensors[gate_key(worst)].values().min():.4g} to "
            f"{tensors[gate_key(worst)].values().max():.4g} (spread {spreads[worst]:.4g})",
            code="GATE_SHAPE",
            hint="this adapter is not expressible as PEFT's adaption prompt; use it as v1",
        )
    out: dict[str, Any] = {}
    for j, i in enumerate(layers):
        out[peft.own_name(i, "prompt")] = prompts[j].unsqueeze(0).clone()
        out[peft.own_name(i, "gate")] = gates[i]
    note = "gates used raw, as LLaMA-Adapter v1's upstream inference and PEFT both do"
    return out, [note]


def _per_layer_to_v1(
    ckpt: Checkpoint, family: Family, config: AdapterConfig, facts: ModelFacts
) -> tuple[dict[str, Any], list[str]]:
    import torch

    tensors = ckpt.canonical()
    n_layers, heads = facts.n_layers, facts.n_heads
    if not n_layers or not heads:
        raise UsageError(
            f"{family.name} -> v1 needs the model's layer and head counts",
            hint="pass --base (Meta dir with params.json, or HF dir with config.json)",
        )
    layers = list(config.prompt_layers)
    if not layers or layers != list(range(n_layers - len(layers), n_layers)):
        raise RefusedError(
            f"{ckpt.path}: v1 adapts the top layers, contiguously, but the prompts are for "
            f"layers {layers} of {n_layers}",
            code="ADAPTER_SHAPE",
            hint="pair the adapter with the base it was trained on",
        )
    prompts = [
        tensors[config.prompt_layers[i]].to_torch().reshape(-1, facts.dim or -1) for i in layers
    ]
    if len({p.shape for p in prompts}) != 1:
        raise RefusedError(
            f"{ckpt.path}: the layers' prompts differ in length",
            code="ADAPTER_SHAPE",
            hint="v1 stacks one prompt length for every layer",
        )
    out: dict[str, Any] = {QUERY_KEY: torch.cat(prompts).clone()}
    dtype = tensors[config.gate_layers[layers[0]]].to_torch().dtype
    for i in range(n_layers):
        if i in config.gate_layers:
            g = tensors[config.gate_layers[i]].to_torch().reshape(-1)
            g = g.expand(heads) if g.numel() == 1 else g
            out[gate_key(i)] = g.reshape(1, heads, 1, 1).clone()
        else:  # v1 gives every layer a gate; the layers it does not adapt keep zero
            out[gate_key(i)] = torch.zeros(1, heads, 1, 1, dtype=dtype)
    notes = [
        f"{family.name}'s gates are trained and used raw: the file records it, so raw inference "
        "(v1's default) reproduces it and --gate tanh is refused"
    ]
    return out, notes


def _target_config(config: AdapterConfig, target: Family) -> AdapterConfig:
    from dataclasses import replace

    return replace(config, family=target)


def _metadata(
    tensors: dict[str, Any],
    ckpt: Checkpoint,
    family: Family,
    target: Family,
    config: AdapterConfig,
    facts: ModelFacts,
) -> dict[str, str]:
    written = _target_config(config, target)
    meta = adapter_metadata(tensors, adapter=written, facts=facts, source=ckpt.path.name)
    meta["converted_from"] = family.name
    meta["tool"] = f"ckpt-doctor {__version__}"
    if target is LLAMA_ADAPTER_V1:
        meta[GATE_TRAINED_KEY] = "raw"
        meta["gate_fn"] = "raw"
        meta["adapter_layer"] = str(len(config.prompt_layers))
    return meta


def _same_logits(result: Conversion, ckpt: Checkpoint, output: Path, base: Checkpoint) -> None:
    """Source and output through the reference model: identical logits, or a finding."""
    import torch

    from ckpt_doctor.loading import load_model

    g = torch.Generator().manual_seed(0)
    with open_checkpoint(output) as converted:
        a, _ = load_model(base, adapter=ckpt, dtype="float32", max_seq_len=64)
        b, _ = load_model(base, adapter=converted, dtype="float32", max_seq_len=64)
        prompts = torch.randint(3, a.args.vocab_size, (2, 16), generator=g)
        with torch.inference_mode():
            la = a(prompts, 0, a.new_cache(2, 16), all_logits=True)
            lb = b(prompts, 0, b.new_cache(2, 16), all_logits=True)
    result.max_logit_diff = float((la - lb).abs().max())
    if not torch.equal(la, lb):
        result.findings.append(
            finding(
                "LOGITS_DIFFER",
                f"the converted adapter does not reproduce {ckpt.path}: max |logit diff| "
                f"{result.max_logit_diff:.3g} on 2 random prompts",
                "report this: a conversion ckpt-doctor calls exact must be exact",
                max_abs=result.max_logit_diff,
            )
        )
