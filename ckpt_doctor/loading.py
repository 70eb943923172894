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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckpt_doctor import cpu_layout, keys, lora_merge, overlay, timings
from ckpt_doctor.adapters import AdapterConfig, checkpoint_adapter, checkpoint_family
from ckpt_doctor.choices import DTYPES, LOAD_MODES, canonical_dtype
from ckpt_doctor.errors import ModelLoadError, UsageError
from ckpt_doctor.facts import model_facts
from ckpt_doctor.families import Family, require_runs_here, run_gate_fn
from ckpt_doctor.findings import Finding
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.model import ModelArgs, Transformer, ffn_hidden_size
from ckpt_doctor.parallel import Shard
from ckpt_doctor.progress import Progress
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.staging import DeviceCopier
from ckpt_doctor.transforms import raw_matches_training, tanh_baked

# Devices whose weights arrive through staging.DeviceCopier (the CPU reads the map directly).
STAGED = ("cuda",)


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
    shard: Shard | None = None,
) -> tuple[Transformer, LoadReport]:
    """Build the model from ``base`` plus an adapter-only file or a full checkpoint.

    ``gate_fn``: None runs the family's own gate function. ``base_rounding``: base tensor name
    -> dtype its values are rounded through first (verify reproducing a checkpoint whose frozen
    tensors were saved in a narrower dtype). ``progress`` hears the bytes of every tensor as it
    is made (the file's bytes, read or cast). ``shard``: this process's part of a
    tensor-parallel run (parallel.py). Three steps: decide what the file needs (every refusal
    comes before a weight is read), load the base, put the adapter in."""
    plan = plan_adapter(base, adapter=adapter, full=full, load_as=load_as, gate_fn=gate_fn)
    model = load_base(
        base, dtype=dtype, device=device, max_seq_len=max_seq_len, base_rounding=base_rounding,
        progress=progress, shard=shard,
    )  # fmt: skip
    report, _ = attach(model, plan, progress=progress)
    return model, report


@dataclass
class AdapterPlan:
    """What loading a file into the model means, decided before any weight is read."""

    extra: Checkpoint | None  # the adapter or full checkpoint; None: the base alone
    full: bool
    load_as: str
    family: Family | None
    config: AdapterConfig | None
    gate_fn: str
    bias: bool
    scale: bool


def plan_adapter(
    base: Checkpoint,
    *,
    adapter: Checkpoint | None = None,
    full: Checkpoint | None = None,
    load_as: str = "strict",
    gate_fn: str | None = None,
) -> AdapterPlan:
    if load_as not in LOAD_MODES:
        raise UsageError(f"unknown --load-as {load_as!r}", hint="use strict or upstream")
    if adapter is not None and full is not None:
        raise UsageError("give --adapter or --full, not both", hint="pick the file to test")
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
    return AdapterPlan(extra, full is not None, load_as, family, config, gate_fn, bias, scale)


class _Maker:
    """The one place the model's tensors are made from the readers' handles: this process's
    slice (tensor parallel), the value a narrower saved dtype gave it, the model's dtype (fp32
    where the family keeps it so), on the device (staging.py: in large pinned chunks on CUDA),
    with progress in the file's bytes."""

    def __init__(self, model: Transformer, *, total: int, progress: Progress | None) -> None:
        self.info: BaseInfo = model.base_info
        self.total, self.done, self.progress = total, 0, progress
        self.keep_fp32: set[str] = set()
        self.full_shapes: dict[str, tuple[int, ...]] = {}
        self.defer = False  # leave the projections in the file's dtype (cast by the layout)

    def __call__(self, h: TensorHandle, name: str = "") -> torch.Tensor:
        info = self.info
        if self.progress is not None:
            self.done += h.nbytes
            self.progress("loading weights", self.done, self.total, "bytes")
        if info.shard is not None and name:
            h = info.shard.local_handle(name, h, self.full_shapes.get(name))
        dtype = torch.float32 if name in self.keep_fp32 else info.dtype
        # The value a checkpoint's own (narrower) saved dtype gave it, then the model's dtype.
        casts = [getattr(torch, info.rounding[name])] if name in info.rounding else []
        with timings.phase("read", sync=False):
            t = h.to_torch()
            if self.defer and not casts and cpu_layout.LAID_OUT.fullmatch(name):
                return t  # the CPU layout's copy casts it (load_base)
        if info.copier is not None:  # CUDA: file dtype over the bus, cast on the device
            with timings.phase("host_to_device", sync=False):
                return info.copier.to_device(t, [*casts, dtype])
        with timings.phase("read"):
            for cast in [*casts, dtype]:
                t = t.to(cast)
            # BLAS kernels pick code paths by alignment; a weight mapped at an odd file offset
            # (safetensors aligns to 8 bytes) would give last-bit-different logits than the same
            # weight from another file. Own copies of misaligned tensors keep results identical.
            return t.clone() if t.data_ptr() % 64 else t

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("loading weights", self.total, self.total, "bytes")


@dataclass
class BaseInfo:
    """How the base went into the model: what attach() needs to put adapters on it."""

    base: Checkpoint
    dtype: torch.dtype
    device: torch.device
    rounding: dict[str, str]
    shard: Shard | None
    copier: DeviceCopier | None


def load_base(
    base: Checkpoint,
    *,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    max_seq_len: int = 512,
    base_rounding: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    shard: Shard | None = None,
    rows: int | None = None,
) -> Transformer:
    """The base model alone, its parameters made from the file map (no second copy on the
    CPU when the dtype matches). attach() then puts an adapter in, and can take it out again.
    ``rows``: the batch the model will decode; on the CPU the projection weights are then cast
    straight into the layout for it (cpu_layout.py), one copy instead of a cast and a layout."""
    device = torch.device(device)
    args = model_args(base, None, max_seq_len=max_seq_len)
    base_tensors = base.canonical()
    with timings.phase("build"), torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
        model = Transformer(args if shard is None else replace(args, shards=shard.world))
    _check_base(base, base_tensors, full)
    if shard is not None:
        shard.check(args)
    # The embedding is there now (_check_base); its dtype is the weights' dtype.
    emb = base_tensors["tok_embeddings.weight"]
    file_dtype = emb.dtype.name if emb.is_float else "float32"
    torch_dtype = resolve_dtype(dtype, device=device, file_dtype=file_dtype)
    copier = DeviceCopier(device) if device.type in STAGED else None
    model.base_info = BaseInfo(base, torch_dtype, device, dict(base_rounding or {}), shard, copier)
    total = sum(base_tensors[n].nbytes for n in full if keys.is_base_key(n))
    make = _Maker(model, total=total // (shard.world if shard else 1), progress=progress)
    make.full_shapes = full
    make.defer = bool(rows) and device.type == "cpu" and args.dim > cpu_layout.SMALL_MODEL_DIM
    state: dict[str, torch.Tensor] = {}
    for name, shape in full.items():
        if keys.is_base_key(name):
            state[name] = make(base_tensors[name], name)
        else:  # the adapter's place: zero gates (an adapter's own come with attach)
            state[name] = torch.zeros(shape, dtype=torch_dtype, device=device)
    if copier is not None:
        copier.finish()
    with timings.phase("build"):
        if shard is not None:
            state = shard.localize(state, full)
            shard.connect(model)
        model.load_state_dict(state, assign=True, strict=True)
        model.eval()
        model.prepare()
    if make.defer:
        with timings.phase("read"):  # the file map's values, cast as they are laid out
            model.lay_out_weights(rows=rows or 1, dtype=torch_dtype)
    make.finish()
    return model


def attach(
    model: Transformer, plan: AdapterPlan, *, progress: Progress | None = None
) -> tuple[LoadReport, Callable[[], None]]:
    """Put ``plan``'s file into a model from load_base (strictly or as its own code loads it):
    its adapter tensors, its structure (prompt rows, adapted layers, bias / scale), and any
    base tensor the file replaces. Returns the report and the undo that gives the base back."""
    info: BaseInfo = model.base_info
    base, extra = info.base, plan.extra
    args = model_args(
        base, plan.config, max_seq_len=model.args.max_seq_len, bias=plan.bias, scale=plan.scale
    )
    with timings.phase("build"), torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    source = "base only" if extra is None else f"{'full' if plan.full else 'adapter'} {extra.path}"
    dtype_name = str(info.dtype).removeprefix("torch.")
    report = LoadReport(
        plan.load_as, source, args, dtype_name, plan.gate_fn, len(expected),
        adapter=plan.config, family=plan.family,
    )  # fmt: skip
    if extra is not None:
        lora_merge.check_runs(report, extra.path)  # a LoRA variant, or no lora_alpha: refused
        if info.shard is not None and report.adapter and report.adapter.lora is not None:
            raise UsageError(
                f"{extra.path}: a LoRA is merged into whole weights; a tensor-parallel process "
                "holds only its slice of them",
                hint="run it without torchrun (or merge the LoRA into the base first)",
            )
    total = sum(h.nbytes for h in extra.canonical().values()) if extra is not None else 0
    make = _Maker(model, total=total, progress=progress)
    make.full_shapes = expected
    # Trained norms and gates stay in fp32 where the family keeps them so (v2 chat).
    if info.dtype != torch.float32:
        make.keep_fp32 = overlay.fp32_names(plan.family, expected)
    # The base's own tensors as the model holds them (what a LoRA merges into); whatever the
    # overlay replaces, or the adapter brings, goes into the model (swap_in), nothing else.
    loaded = {k: v for k, v in model.state_dict().items() if keys.is_base_key(k)}
    state: dict[str, torch.Tensor] = dict(loaded)
    base_tensors = base.canonical() if make.keep_fp32 else {}
    for name, shape in expected.items():
        if not keys.is_base_key(name):  # the adapter's own init: zero gates and prompt, zero
            fill = 1.0 if name.endswith("_scale") else 0.0  # biases, unit scales
            dt = torch.float32 if name in make.keep_fp32 else info.dtype
            state[name] = torch.full(shape, fill, dtype=dt, device=info.device)
        elif name in make.keep_fp32:  # a base norm the family runs in fp32: from the file
            state[name] = make(base_tensors[name], name)
    if extra is not None:
        overlay.apply(state, expected, extra, report, make, mode=plan.load_as, full=plan.full)
    if info.copier is not None:
        info.copier.finish()
    state = {k: v for k, v in state.items() if v is not loaded.get(k)}
    with timings.phase("build"):
        if info.shard is not None:
            state = info.shard.localize(state, expected)
            args = replace(args, shards=info.shard.world)
        undo = model.swap_in(args, state)
        model.prepare(gate_fn=plan.gate_fn, rounded=overlay.prompt_rounding(plan.family))
    make.finish()
    return report, undo


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
