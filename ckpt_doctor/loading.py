"""Put checkpoint weights into the reference model, strictly or exactly as the family's own code
does (overlay.py).

The model is built on the meta device and its parameters are then assigned tensors made from
the readers' lazy handles: when the dtype already matches, a parameter *is* the copy-on-write
map of the file, so no second full copy of the weights is ever in memory.

- ``strict``: resolve the container and prefixes, require every model key; missing, unexpected
  and shape-mismatched keys become findings.
- ``upstream``: load the base, then the given file as the family's own code does (LLaMA-Adapter
  v1's example.py: ``load_state_dict(torch.load(path), strict=False)``; v2 chat: the same on
  ``['model']``; PEFT: its adapter names), and report how many keys matched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_doctor import keys, lora_merge, overlay
from ckpt_doctor.adapters import AdapterConfig, checkpoint_adapter, checkpoint_family
from ckpt_doctor.choices import DTYPES, LOAD_MODES, canonical_dtype
from ckpt_doctor.errors import ModelLoadError, UsageError
from ckpt_doctor.facts import model_facts
from ckpt_doctor.families import Family, require_runs_here, run_gate_fn
from ckpt_doctor.findings import Finding
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.model import ModelArgs, Transformer, ffn_hidden_size
from ckpt_doctor.progress import Progress
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.transforms import raw_matches_training, tanh_baked


@dataclass
class LoadReport:
    mode: str
    source: str
    args: ModelArgs
    dtype: str
    gate_fn: str
    model_keys: int
    from_file: list[str] = field(default_factory=list)  # keys taken from --adapter / --full
    unexpected: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    adapter: AdapterConfig | None = None
    family: Family | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "source": self.source,
            "family": self.family.name if self.family is not None else None,
            "dtype": self.dtype,
            "gate_fn": self.gate_fn,
            "model_keys": self.model_keys,
            "matched": len(self.from_file),
            "unexpected": len(self.unexpected),
            "adapter_len": self.args.adapter_len,
            "adapter_layer": self.args.adapter_layer,
        }


def resolve_dtype(name: str, *, device: torch.device, file_dtype: str) -> torch.dtype:
    """``auto``: the file's dtype on a GPU, float32 on the CPU (fp16 matmuls crawl there)."""
    name = canonical_dtype(name)  # bf16, fp16, half, fp32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}")
    if name == "auto":
        name = file_dtype if device.type == "cuda" and file_dtype != "float32" else "float32"
    return getattr(torch, name)


def model_args(
    base: Checkpoint,
    adapter: AdapterConfig | None,
    *,
    max_seq_len: int,
    bias: bool = False,
    scale: bool = False,
) -> ModelArgs:
    facts = model_facts(base.canonical(), params=base.params)
    missing = [n for n in ("dim", "n_layers", "n_heads", "vocab_size") if not getattr(facts, n)]
    if missing:
        raise UsageError(
            f"{base.path}: cannot tell the model's {', '.join(missing)}",
            hint="pass a base with params.json (Meta) or config.json (HF) beside the weights",
        )
    params = base.params or {}
    unlike = _not_llama(params, facts.n_heads, facts.dim)
    if unlike:
        raise UsageError(
            f"{base.path}: {unlike}; the reference model runs LLaMA's own architecture only, so "
            "its tokens would not be this model's",
            hint="inspect, diff, extract and verify's static checks still work on this base",
        )
    theta = params.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise UsageError(
            f"{base.path}: rope_theta {theta!r} is not a positive number",
            hint="fix params.json / config.json (LLaMA's theta is 10000; LLaMA 3's 500000)",
        )
    ffn = facts.ffn_hidden or ffn_hidden_size(facts.dim or 0, facts.multiple_of or 256)
    a_len = adapter.adapter_len if adapter and adapter.adapter_len else 0
    a_layer = adapter.adapter_layer if adapter and adapter.adapter_layer else 0
    if a_layer > (facts.n_layers or 0):
        a_len = a_layer = 0  # ADAPTER_SHAPE says why; run as the base
    return ModelArgs(
        dim=facts.dim or 0,
        n_layers=facts.n_layers or 0,
        n_heads=facts.n_heads or 0,
        vocab_size=facts.vocab_size or 0,
        ffn_hidden=ffn,
        norm_eps=facts.norm_eps or 1e-5,
        rope_theta=float(theta),
        max_seq_len=max_seq_len,
        adapter_len=a_len,
        adapter_layer=a_layer,
        bias=bias,
        scale=scale,
    )


def _not_llama(params: Mapping[str, Any], heads: int | None, dim: int | None) -> str:
    """What in a base's config makes it another architecture than the reference model's ("" if
    nothing): grouped-query attention, scaled RoPE, biases, another activation or head size."""
    kv_heads = params.get("n_kv_heads")
    if isinstance(kv_heads, int) and kv_heads != heads:
        return f"{kv_heads} key/value heads for {heads} query heads (grouped-query attention)"
    if params.get("rope_scaling") or params.get("use_scaled_rope"):
        return f"scaled RoPE ({params.get('rope_scaling') or 'use_scaled_rope'})"
    if params.get("attention_bias") or params.get("mlp_bias"):
        return "biases in its attention / MLP projections"
    if params.get("hidden_act", "silu") != "silu":
        return f"activation {params['hidden_act']} (LLaMA's is SiLU)"
    head_dim = params.get("head_dim")
    if head_dim and heads and dim and head_dim * heads != dim:
        return f"head_dim {head_dim} x {heads} heads != hidden size {dim}"
    if params.get("model_type", "llama") not in ("llama",):
        return f"model_type {params['model_type']}"
    return ""


def load_model(
    base: Checkpoint,
    *,
    adapter: Checkpoint | None = None,
    full: Checkpoint | None = None,
    load_as: str = "strict",
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    gate_fn: str | None = None,
    max_seq_len: int = 512,
    base_rounding: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> tuple[Transformer, LoadReport]:
    """Build the model from ``base`` plus an adapter-only file or a full checkpoint.

    ``gate_fn``: None runs the family's own gate function. ``base_rounding``: base tensor name
    -> dtype its values are rounded through first (verify reproducing a checkpoint whose frozen
    tensors were saved in a narrower dtype). ``progress`` hears the bytes of every tensor as it
    is made (the file's bytes, read or cast)."""
    if load_as not in LOAD_MODES:
        raise UsageError(f"unknown --load-as {load_as!r}", hint="use strict or upstream")
    if adapter is not None and full is not None:
        raise UsageError("give --adapter or --full, not both", hint="pick the file to test")
    device = torch.device(device)
    extra = adapter or full
    if extra is not None:
        extra.borrow_params(base)
    family = checkpoint_family(extra) if extra is not None else None
    config = checkpoint_adapter(extra, family=family) if extra is not None else None
    if extra is not None:
        require_runs_here(family, extra.path, command="the reference model")
    gate_fn = run_gate_fn(family, gate_fn)
    if gate_fn == "tanh" and extra is not None and raw_matches_training(extra.metadata):
        why = (
            "tanh baked in; --gate tanh would apply it twice"  # tanh(tanh(g)) under-weights
            if tanh_baked(extra.metadata)
            else "trained raw (converted from a family that trains raw gates); --gate tanh "
            "would misweight them"
        )
        raise UsageError(f"{extra.path} holds gates with {why}", hint="use --gate raw")
    bias, scale = overlay.tuning(extra.canonical() if extra is not None else {})
    args = model_args(base, config, max_seq_len=max_seq_len, bias=bias, scale=scale)
    base_tensors = base.canonical()
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_base(base, base_tensors, expected)
    # The embedding is there now (_check_base); its dtype is the weights' dtype.
    emb = base_tensors["tok_embeddings.weight"]
    file_dtype = emb.dtype.name if emb.is_float else "float32"
    torch_dtype = resolve_dtype(dtype, device=device, file_dtype=file_dtype)
    source = "base only" if extra is None else f"{'adapter' if adapter else 'full'} {extra.path}"
    dtype_name = str(torch_dtype).removeprefix("torch.")
    report = LoadReport(
        load_as, source, args, dtype_name, gate_fn, len(expected), adapter=config, family=family
    )
    if extra is not None:
        lora_merge.check_runs(report, extra.path)  # a LoRA variant, or no lora_alpha: refused
    # Trained norms and gates stay in fp32 where the family keeps them so (v2 chat).
    keep_fp32 = overlay.fp32_names(family, expected) if torch_dtype != torch.float32 else set()
    rounding = dict(base_rounding or {})
    # The bytes to make: the base's model tensors and, at most, all of the extra file's.
    total = sum(base_tensors[n].nbytes for n in expected if keys.is_base_key(n))
    total += sum(h.nbytes for h in extra.canonical().values()) if extra is not None else 0
    done = [0]

    def tensor(h: TensorHandle, name: str = "") -> torch.Tensor:
        if progress is not None:
            done[0] += h.nbytes
            progress("loading weights", done[0], total, "bytes")
        t = h.to_torch()
        if name in rounding:  # the value the checkpoint's own (narrower) dtype gave it
            t = t.to(getattr(torch, rounding[name]))
        t = t.to(device=device, dtype=torch.float32 if name in keep_fp32 else torch_dtype)
        # BLAS kernels pick code paths by alignment; a weight mapped at an odd file offset
        # (safetensors aligns to 8 bytes) would give last-bit-different logits than the same
        # weight from another file. Own copies of misaligned tensors keep results identical.
        return t.clone() if t.data_ptr() % 64 else t

    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if keys.is_base_key(name):
            state[name] = tensor(base_tensors[name], name)
        else:  # the adapter's own init: zero gates and prompt, zero biases, unit scales
            fill = 1.0 if name.endswith("_scale") else 0.0
            dt = torch.float32 if name in keep_fp32 else torch_dtype
            state[name] = torch.full(shape, fill, dtype=dt, device=device)
    if extra is not None:
        overlay.apply(state, expected, extra, report, tensor, mode=load_as, full=full is not None)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    model.prepare(gate_fn=gate_fn, rounded=overlay.prompt_rounding(family))
    if progress is not None:
        progress("loading weights", total, total, "bytes")
    return model, report


def _check_base(
    base: Checkpoint, base_tensors: dict[str, TensorHandle], expected: dict[str, tuple[int, ...]]
) -> None:
    """Every base tensor the model needs is there, in its shape (before any is read)."""
    for name, shape in expected.items():
        if not keys.is_base_key(name):
            continue
        if name in base_tensors and base_tensors[name].shape == shape:
            continue
        got = list(base_tensors[name].shape) if name in base_tensors else "missing"
        raise ModelLoadError(
            f"{base.path}: base tensor {name} is {got}, the model needs {list(shape)}",
            code="MISSING_TENSORS" if got == "missing" else "BASE_MISMATCH",
            hint="pass a complete base checkpoint (all layers, params.json beside it)",
        )
