"""Put checkpoint weights into the reference model, strictly or exactly as upstream does.

The model is built on the meta device and its parameters are then assigned tensors made from
the readers' lazy handles: when the dtype already matches, a parameter *is* the copy-on-write
map of the file, so no second full copy of the weights is ever in memory.

- ``strict``: resolve the container and prefixes, require every model key; missing, unexpected
  and shape-mismatched keys become findings.
- ``upstream``: load the base, then the given file as upstream example.py does,
  ``load_state_dict(torch.load(path), strict=False)``, and report how many keys matched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_doctor import keys
from ckpt_doctor.choices import DTYPES, LOAD_MODES, canonical_dtype
from ckpt_doctor.errors import ModelLoadError, UsageError
from ckpt_doctor.facts import AdapterConfig, adapter_config, model_facts
from ckpt_doctor.families import (
    V1_QUERY_KEY,
    check_gate_fn,
    is_adapter_key,
    require_runs_here,
    v1_gate_key,
)
from ckpt_doctor.findings import Finding, finding
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.model import ModelArgs, Transformer, ffn_hidden_size
from ckpt_doctor.progress import Progress
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.transforms import tanh_baked


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

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "source": self.source,
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


def model_args(base: Checkpoint, adapter: AdapterConfig | None, *, max_seq_len: int) -> ModelArgs:
    facts = model_facts(base.canonical(), params=base.params)
    missing = [n for n in ("dim", "n_layers", "n_heads", "vocab_size") if not getattr(facts, n)]
    if missing:
        raise UsageError(
            f"{base.path}: cannot tell the model's {', '.join(missing)}",
            hint="pass a base with params.json (Meta) or config.json (HF) beside the weights",
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
        max_seq_len=max_seq_len,
        adapter_len=a_len,
        adapter_layer=a_layer,
    )


def load_model(
    base: Checkpoint,
    *,
    adapter: Checkpoint | None = None,
    full: Checkpoint | None = None,
    load_as: str = "strict",
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    gate_fn: str = "raw",
    max_seq_len: int = 512,
    progress: Progress | None = None,
) -> tuple[Transformer, LoadReport]:
    """Build the model from ``base`` plus an adapter-only file or a full checkpoint.
    ``progress`` hears the bytes of every tensor as it is made (the file's bytes, read or cast)."""
    if load_as not in LOAD_MODES:
        raise UsageError(f"unknown --load-as {load_as!r}", hint="use strict or upstream")
    if adapter is not None and full is not None:
        raise UsageError("give --adapter or --full, not both", hint="pick the file to test")
    check_gate_fn(gate_fn)
    device = torch.device(device)
    extra = adapter or full
    config = None
    if extra is not None:
        config = adapter_config(extra.canonical(), args=extra.args, metadata=extra.metadata)
    if gate_fn == "tanh" and extra is not None and tanh_baked(extra.metadata):
        raise UsageError(  # tanh(tanh(g)) would under-weight the adapter
            f"{extra.path} holds gates with tanh baked in; --gate tanh would apply it twice",
            hint="use --gate raw with this file",
        )
    if config is not None and load_as == "strict":  # upstream mode loads anything, as upstream
        require_runs_here(config.family, extra.path, command="the reference model")
    args = model_args(base, config, max_seq_len=max_seq_len)
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
    report = LoadReport(load_as, source, args, dtype_name, gate_fn, len(expected), adapter=config)
    # The bytes to make: the base's model tensors and, at most, all of the extra file's.
    total = sum(base_tensors[n].nbytes for n in expected if not is_adapter_key(n))
    total += sum(h.nbytes for h in extra.canonical().values()) if extra is not None else 0
    done = [0]

    def tensor(h: TensorHandle) -> torch.Tensor:
        if progress is not None:
            done[0] += h.nbytes
            progress("loading weights", done[0], total, "bytes")
        t = h.to_torch().to(device=device, dtype=torch_dtype)
        # BLAS kernels pick code paths by alignment; a weight mapped at an odd file offset
        # (safetensors aligns to 8 bytes) would give last-bit-different logits than the same
        # weight from another file. Own copies of misaligned tensors keep results identical.
        return t.clone() if t.data_ptr() % 64 else t

    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if is_adapter_key(name):  # upstream's init: the gates are zero, so the prompt is inert
            state[name] = torch.zeros(shape, dtype=torch_dtype, device=device)
        else:
            state[name] = tensor(base_tensors[name])
    if extra is not None and load_as == "upstream":
        _overlay_upstream(state, expected, extra, report, tensor)
    elif extra is not None:
        _overlay_strict(state, expected, extra, report, tensor, full=full is not None)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    model.prepare(gate_fn=gate_fn)
    if progress is not None:
        progress("loading weights", total, total, "bytes")
    return model, report


Shapes = dict[str, tuple[int, ...]]
ToTensor = Callable[[TensorHandle], torch.Tensor]


def _check_base(base: Checkpoint, base_tensors: dict[str, TensorHandle], expected: Shapes) -> None:
    """Every base tensor the model needs is there, in its shape (before any is read)."""
    for name, shape in expected.items():
        if is_adapter_key(name) or (name in base_tensors and base_tensors[name].shape == shape):
            continue
        got = list(base_tensors[name].shape) if name in base_tensors else "missing"
        raise ModelLoadError(
            f"{base.path}: base tensor {name} is {got}, the model needs {list(shape)}",
            code="MISSING_TENSORS" if got == "missing" else "BASE_MISMATCH",
            hint="pass a complete base checkpoint (all layers, params.json beside it)",
        )


def _overlay_upstream(
    state: dict[str, torch.Tensor],
    expected: Shapes,
    extra: Checkpoint,
    report: LoadReport,
    tensor: ToTensor,
) -> None:
    raw = extra.upstream_view()
    for name, handle in raw.items():
        if name not in expected or handle is None:
            report.unexpected.append(name)
            continue
        if name == V1_QUERY_KEY and not report.args.adapter_layer:
            continue  # its split is unknown (see _unresolved_adapter): the model runs without it
        if handle.shape != expected[name]:  # torch raises even with strict=False
            code = _shape_code(name)
            raise ModelLoadError(
                f"load_state_dict(strict=False) raises on {name}: shape {list(handle.shape)} "
                f"in {extra.path}, {list(expected[name])} in the model",
                code=code,
                hint="upstream would crash here too; repair the file (e.g. broadcast the gate)",
            )
        state[name] = tensor(handle)
        report.from_file.append(name)
    if not report.from_file:
        from ckpt_doctor.checks import load_nothing

        report.findings.append(load_nothing(extra, model_keys=len(expected)))


def _overlay_strict(
    state: dict[str, torch.Tensor],
    expected: Shapes,
    extra: Checkpoint,
    report: LoadReport,
    tensor: ToTensor,
    *,
    full: bool,
) -> None:
    args: ModelArgs = report.args
    src = extra.canonical()
    for name, handle in src.items():
        if name not in expected:
            report.unexpected.append(name)
            continue
        if name == V1_QUERY_KEY and not args.adapter_layer:
            continue  # its split is unknown (see _unresolved_adapter): the model runs without it
        shape = expected[name]
        if handle.shape != shape and name.endswith(".gate") and handle.numel == 1:
            state[name] = tensor(handle).reshape(1, 1, 1, 1).expand(shape).clone()
            report.from_file.append(name)
            continue
        if handle.shape != shape:
            raise ModelLoadError(
                f"{extra.path}: {name} is {list(handle.shape)}, the model needs {list(shape)}",
                code=_shape_code(name),
                hint="pair this file with the base it was trained on",
            )
        state[name] = tensor(handle)
        report.from_file.append(name)
    _unresolved_adapter(report, src)
    scalar = [n for n in report.from_file if n.endswith(".gate") and src[n].numel == 1]
    if scalar:
        # Counted over every gate in the file (inspect counts the adapted layers' only).
        gates = [n for n in report.from_file if n.endswith(".gate")]
        report.findings.append(
            finding(
                "GATE_SHAPE",
                f"{len(scalar)} of the file's {len(gates)} gates (every layer's, adapted or "
                f"not) are legacy scalars [1], broadcast to [1, {args.n_heads}, 1, 1] for this "
                "run",
                "repair the file so upstream's per-head model can load it",
                layers=[keys.layer_index(n) for n in scalar],
            )
        )
    if report.adapter is None:
        adapter_missing = [V1_QUERY_KEY, "layers.N.attention.gate"]
    else:
        required = [V1_QUERY_KEY, *(v1_gate_key(i) for i in args.adapted_layers)]
        adapter_missing = [n for n in required if n not in src]
        if not report.adapter.gate_layers and not args.adapter_layer:
            adapter_missing.append("layers.N.attention.gate")
    base_missing = [n for n in expected if full and not is_adapter_key(n) and n not in src]
    if base_missing:
        report.findings.append(
            finding(
                "MISSING_TENSORS",
                f"{len(base_missing)} model tensor(s) absent from {extra.path}; the base's were "
                f"used: {', '.join(base_missing[:5])}",
                "re-save the full checkpoint, or pass --adapter with the base instead",
                tensors=base_missing,
            )
        )
    if adapter_missing:
        report.findings.append(
            finding(
                "ADAPTER_MISSING",
                f"{extra.path} lacks adapter tensor(s) {', '.join(adapter_missing[:5])}: "
                "the model runs without them (zero gates: as the base)",
                "extract the adapter from the training checkpoint again",
                tensors=adapter_missing,
            )
        )
    if report.unexpected:
        report.findings.append(
            finding(
                "UNEXPECTED_KEYS",
                f"{len(report.unexpected)} key(s) in {extra.path} are not model parameters and "
                f"were ignored: {', '.join(report.unexpected[:5])}",
                "check the file is a LLaMA(-Adapter v1) checkpoint for this base",
                tensors=report.unexpected,
            )
        )


def _unresolved_adapter(report: LoadReport, src: dict[str, TensorHandle]) -> None:
    """An adapter whose adapter_len x adapter_layer nothing tells (no args, no trained gate)."""
    config = report.adapter
    if config is None or report.args.adapter_layer or V1_QUERY_KEY not in src:
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
                f"adapter_query.weight {list(src[V1_QUERY_KEY].shape)} in {report.source} does "
                "not split into adapter_len x adapter_layer; the model runs without it",
                "pass the checkpoint with its training args, or the adapter's own base",
            )
        )


def _shape_code(name: str) -> str:
    if name in keys.VOCAB_KEYS:
        return "VOCAB_MISMATCH"
    if name.endswith(".gate"):
        return "GATE_SHAPE"
    return "ADAPTER_SHAPE" if is_adapter_key(name) else "BASE_MISMATCH"
