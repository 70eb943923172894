"""Typed launcher for the fused gated-attention kernels: validates, picks the grid, launches.

The package imports without Triton and without a GPU; ``fused_unavailable_reason()`` says why
the fused path cannot run here, and ``gated_attention`` raises ``KernelInputError`` (a
UsageError with a hint) on anything the kernels do not accept instead of computing garbage.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ckpt_doctor.errors import UsageError
from ckpt_doctor.families import apply_gate

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The oldest Triton the kernels are tested on (its interpreter and an ahead-of-time compile
# for sm_80 / sm_90a); 3.0, which torch 2.4 pins, rejects them (tl.arange of a bound it does
# not see as constexpr).
MIN_TRITON = (3, 4)
MAX_ADAPTER_LEN = 256
MAX_HEAD_DIM = 256
DECODE_BLOCK_N = 64
MAX_SPLITS = 128
# Decode programs to aim for per multiprocessor. K/V reach the registers by plain loads (no
# async copies outside tl.dot), so the loads in flight, and so the bandwidth, grow with the
# programs resident: a 4-warp decode program takes ~96 registers, 5 fit on an H100/H200 SM.
# benchmarks/attention_gpu.py times 2, 4 and 8.
PROGRAMS_PER_SM = 4
SAME = "cast and move it to q's dtype and device"


class KernelInputError(UsageError):
    """The tensors handed to a fused kernel do not fit what it computes."""

    code = "KERNEL_INPUT"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_problem() -> str | None:
    """Why the installed Triton cannot run the kernels (None: it can). Read from the package's
    metadata: importing Triton costs seconds, and an old one fails inside the first launch."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'ckpt-doctor[triton]')"
    for dist in ("triton", "pytorch-triton"):  # the second: torch nightlies' build
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
        if numbers < MIN_TRITON:
            return (
                f"Triton {version} is installed; the kernels need {MIN_TRITON[0]}."
                f"{MIN_TRITON[1]} or newer (pip install 'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}')"
            )
        return None
    return None  # importable without metadata (a source build): let the first launch tell


def fused_unavailable_reason(device: torch.device) -> str | None:
    """None when the fused kernels can run on ``device``; otherwise why not."""
    problem = triton_problem()
    if problem is not None:
        return problem
    if device.type == "cuda" or interpreting():
        return None
    return f"the fused kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not {device}"


def per_head_gate(gate: torch.Tensor, n_heads: int, *, gate_fn: str) -> torch.Tensor:
    """The gate as the kernels take it: fp32 [H], the gate function applied, a scalar broadcast.
    (Differentiable: training computes its adapter K/V and gates through here too.)"""
    g = apply_gate(gate.float().reshape(-1), gate_fn)
    if g.numel() == 1:
        return g.expand(n_heads).contiguous()
    if g.numel() != n_heads:
        raise KernelInputError(
            f"gate has {g.numel()} values for {n_heads} heads",
            hint="pass one gate per head, or a single scalar gate to broadcast",
        )
    return g.contiguous()


def _check(cond: bool, message: str, hint: str) -> None:
    if not cond:
        raise KernelInputError(message, hint=hint)


def check_sizes(*, head_dim: int, adapter_len: int) -> None:
    """The model-level limits of the kernels, checked once before check=False launches."""
    _check(
        0 < head_dim <= MAX_HEAD_DIM,
        f"head_dim {head_dim} is not in 1..{MAX_HEAD_DIM}",
        "use --attention reference",
    )
    _check(
        adapter_len <= MAX_ADAPTER_LEN,
        f"adapter_len {adapter_len} is over {MAX_ADAPTER_LEN}",
        "use --attention reference",
    )


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int | torch.Tensor,
    adapter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> None:
    _check(q.dim() == 4, f"q must be [B, H, T, hd], got {list(q.shape)}", "split the heads first")
    b, h, t, hd = q.shape
    _check(q.dtype in DTYPES, f"unsupported dtype {q.dtype}", "use float16, bfloat16 or float32")
    # An adapter_k of the wrong rank is reported with the adapter's checks below.
    la = adapter[0].shape[1] if adapter is not None and adapter[0].dim() == 3 else 0
    check_sizes(head_dim=hd, adapter_len=la)
    if isinstance(start, torch.Tensor):  # read on the device at run time (CUDA graphs)
        _check(
            t == 1 and start.numel() == 1 and not start.is_floating_point(),
            f"a position tensor needs one query (T={t}) and one integer, got {start.dtype} "
            f"{list(start.shape)}",
            "pass the position as an int, or decode one token at a time",
        )
        _check(start.device == q.device, "the position tensor is not on q's device", SAME)
        start = 0  # the cache-length check below is up to the caller then
    _check(start >= 0 and t >= 1, f"start {start}, T {t}", "start >= 0 and at least one query")
    _check(b <= 65535 and h <= 65535, f"batch {b}, {h} heads", "at most 65535 of each")
    for name, x in (("k", k), ("v", v)):
        _check(
            x.dim() == 4 and x.shape[0] >= b and x.shape[1] == h and x.shape[3] == hd,
            f"{name} cache is {list(x.shape)} for q {list(q.shape)}",
            "the cache must be [>=B, H, max_len, hd]",
        )
        _check(x.shape[2] >= start + t, f"{name} cache holds {x.shape[2]} positions", "grow it")
        _check(
            x.dtype == q.dtype and x.device == q.device, f"{name}: dtype/device differ from q", SAME
        )
    if adapter is None:
        return
    ak, av, gate = adapter
    for name, x in (("adapter_k", ak), ("adapter_v", av)):
        _check(
            x.dim() == 3 and x.shape[0] == h and x.shape[2] == hd,
            f"{name} is {list(x.shape)}, expected [H={h}, La, hd={hd}]",
            "compute the adapter K/V with the model's own wk/wv",
        )
        _check(
            x.dtype == q.dtype and x.device == q.device, f"{name}: dtype/device differ from q", SAME
        )
    _check(ak.shape[1] == av.shape[1], "adapter_k and adapter_v lengths differ", "one prompt")
    _check(ak.shape[1] > 0, "adapter_k has no rows", "pass no adapter instead")
    _check(
        gate.dtype == torch.float32 and gate.shape == (h,) and gate.device == q.device,
        f"gate must be fp32 [{h}] on {q.device}, got {gate.dtype} {list(gate.shape)}",
        "normalise it with per_head_gate()",
    )


def _pow2(n: int, *, at_least: int = 16) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a few splits, so that the merge is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(rows: int, keys: int, device: torch.device) -> int:
    """Enough splits for heads x splits to give each SM PROGRAMS_PER_SM programs, each split
    at least one block of keys."""
    programs = PROGRAMS_PER_SM * _multiprocessors(device)
    return max(1, min(MAX_SPLITS, math.ceil(programs / rows), math.ceil(keys / DECODE_BLOCK_N)))


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    start: int | torch.Tensor,
    adapter_k: torch.Tensor | None = None,
    adapter_v: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Fused equivalent of kernels.reference.gated_attention_reference (same arguments).

    For one-token decode ``start`` may be a one-element integer tensor on q's device: the
    kernels read it at run time over a grid sized for the whole cache, so a captured CUDA graph
    replays for every position (the caller keeps it below the cache length).

    ``check=False`` skips the input checks (~40 us a call, which a 32-layer decode step pays
    32 times): only for callers whose tensors fit by construction, as the model's do."""
    adapter = None
    if adapter_k is not None or adapter_v is not None or gate is not None:
        _check(
            adapter_k is not None and adapter_v is not None and gate is not None,
            "adapter_k, adapter_v and gate go together",
            "pass all three, or none for plain causal attention",
        )
        adapter = (adapter_k, adapter_v, gate)  # type: ignore[assignment]
    if check:
        _validate(q, k, v, start, adapter)
        reason = fused_unavailable_reason(q.device)
        _check(reason is None, f"fused attention cannot run: {reason}", "use --attention reference")

    out = torch.empty_like(q)
    for kernel, grid, args, constexprs in cached_plan(q, k, v, out, start=start, adapter=adapter):
        kernel[grid](*args, **constexprs)
    return out


# Launch plans by everything they depend on except the tensors' addresses (shapes, strides,
# dtype, device, the kind of position, the adapter's size; an int decode position only through
# the split count and chunk it gives). A decode step of a 32-layer model asks for the same plan
# 32 times; building it is Python work the GPU waits for when launches are eager
# (benchmarks/launch_overhead.py measures it). Bounded: a new key beyond MAX_PLANS clears it
# (plans hold no tensors, so nothing a captured CUDA graph uses goes with them).
_PLANS: dict[tuple, _Template] = {}
MAX_PLANS = 256


def cached_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    start: int | torch.Tensor,
    adapter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> list[tuple[Any, Any, tuple, dict[str, Any]]]:
    """plan()'s launches as (kernel, grid, args, constexprs), the plan built once per shape
    and only this call's tensors, scratch and position filled in."""
    in_memory = isinstance(start, torch.Tensor)
    t = q.shape[2]
    split = None
    if t == 1 and not in_memory:  # the plan differs only where the split layout does
        split = _split_layout(q.shape[0] * q.shape[1], start + 1, q.device)
    key = (
        q.shape, q.stride(), k.shape, k.stride(), v.stride(), out.stride(), q.dtype, q.device,
        in_memory, split, start if t > 1 else None, PROGRAMS_PER_SM,
        None if adapter is None else (adapter[0].shape, adapter[0].stride(), adapter[1].stride()),
    )  # fmt: skip
    cached = _PLANS.get(key)
    if cached is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        cached = _PLANS[key] = _template(q, k, v, out, start=start, adapter=adapter)
    ak, av, g = adapter if adapter is not None else (q[0], q[0], _zeros(q.shape[1], q.device))
    if cached.part is None:  # prefill
        ((kernel, grid, const),) = cached.launches
        return [(kernel, grid, (q, k, v, ak, av, g, out, *cached.tails[0]), const)]
    (k1, grid1, c1), (k2, grid2, c2) = cached.launches
    part = torch.empty(cached.part, device=q.device, dtype=torch.float32)
    lse = torch.empty(cached.lse, device=q.device, dtype=torch.float32)
    pos = (0, start) if in_memory else (start, q)  # START, Pos
    partial = (q, k, v, part, lse, *cached.middle, *pos, *cached.tails[0])
    combine = (part, lse, q, ak, av, g, out, *cached.tails[1])
    return [(k1, grid1, partial, c1), (k2, grid2, combine, c2)]


@dataclass(frozen=True)
class _Template:
    """plan() cut into what stays from call to call and what each call fills in."""

    launches: tuple  # (kernel, grid, constexprs) per launch
    tails: tuple  # per launch, the arguments after the ones each call fills in
    part: tuple | None = None  # decode: the shapes of its scratch (allocated per call)
    lse: tuple | None = None
    middle: tuple = ()  # decode partial: q/k/v strides and H, between the scratch and START


def _template(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    start: int | torch.Tensor,
    adapter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> _Template:
    launches = plan(q, k, v, out, start=start, adapter=adapter)
    fixed = tuple((p.kernel, p.grid, p.constexprs) for p in launches)
    if len(launches) == 1:  # prefill: q, k, v, ak, av, g, out, then strides and sizes
        return _Template(fixed, (launches[0].args[7:],))
    # decode partial: q, k, v, part, lse, 3 q + 8 k/v strides, H, START, Pos, CHUNK, SPLITS,
    # scale; combine: part, lse, q, ak, av, g, out, then strides and sizes.
    partial, combine = launches
    args = partial.args
    scratch = tuple(args[3].shape), tuple(args[4].shape)
    return _Template(fixed, (args[19:], combine.args[7:]), *scratch, args[5:17])


@functools.cache
def _zeros(h: int, device: torch.device) -> torch.Tensor:
    """The gate slot of a launch without an adapter (never read by the kernels)."""
    return torch.zeros(h, dtype=torch.float32, device=device)


def _split_layout(rows: int, keys: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) of a decode over ``keys`` keys: every split non-empty."""
    splits = _splits(rows, keys, device)
    chunk = math.ceil(math.ceil(keys / splits) / DECODE_BLOCK_N) * DECODE_BLOCK_N
    return math.ceil(keys / chunk), chunk


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what runs, on which grid, with which arguments."""

    kernel: Any  # a Triton kernel (JITFunction or Autotuner)
    grid: Any  # a tuple, or a function of the chosen config's meta-parameters
    args: tuple
    constexprs: dict[str, Any]


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    start: int | torch.Tensor,
    adapter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> list[Launch]:
    """The launches that compute gated attention into ``out``: one for prefill, split-KV plus
    combine for decode. kernels/aot.py compiles from the same plan (on meta tensors), so the
    ahead-of-time signatures are the ones these launches specialise to."""
    from ckpt_doctor.kernels import triton_attention as ta  # Triton loads here, not at import

    b, h, t, hd = q.shape
    # Without an adapter the kernels never read these; any [H, *, hd] tensor fills the slots.
    ak, av, g = (
        adapter if adapter is not None else (q[0], q[0], q.new_zeros(h, dtype=torch.float32))
    )
    la = ak.shape[1] if adapter is not None else 1
    scale_log2 = (1.0 / math.sqrt(hd)) * math.log2(math.e)
    common = {"HEAD_DIM": hd, "BLOCK_D": _pow2(hd)}
    block_a = _pow2(la)
    # fp32 inputs: exact fp32 products (tf32 would lose 13 mantissa bits); ignored for 16-bit.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if t > 1:
        if isinstance(start, torch.Tensor):
            raise KernelInputError("prefill needs an int start", hint="pass start as an int")
        args = (
            q, k, v, ak, av, g, out,
            *q.stride(), *k.stride(), *v.stride(), *ak.stride(), *av.stride(), *out.stride(),
            t, start, la, scale_log2, max(t, 1).bit_length(),
        )  # fmt: skip
        const = {"BLOCK_A": block_a, "HAS_ADAPTER": adapter is not None, "PRECISION": precision}
        grid = lambda meta: (math.ceil(t / meta["BLOCK_M"]), h, b)  # noqa: E731
        return [Launch(ta.gated_prefill_kernel, grid, args, {**const, **common})]
    in_memory = isinstance(start, torch.Tensor)
    keys = k.shape[2] if in_memory else start + 1  # the grid covers every key there may be
    splits, chunk = _split_layout(b * h, keys, q.device)
    part = torch.empty(b * h, splits, common["BLOCK_D"], device=q.device, dtype=torch.float32)
    lse = torch.empty(b * h, splits, device=q.device, dtype=torch.float32)
    qs = (q.stride(0), q.stride(1), q.stride(3))
    partial = (
        q, k, v, part, lse, *qs,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        h, 0 if in_memory else start, start if in_memory else q, chunk, splits, scale_log2,
    )  # fmt: skip
    combine = (
        part, lse, q, ak, av, g, out, *qs, *ak.stride(), *av.stride(),
        out.stride(0), out.stride(1), out.stride(3), h, splits, la, scale_log2,
    )  # fmt: skip
    return [
        Launch(
            ta.decode_partial_kernel, (b * h, splits), partial,
            {"BLOCK_N": DECODE_BLOCK_N, "POS_IN_MEMORY": in_memory, **common},
        ),
        Launch(
            ta.decode_combine_kernel, (b * h,), combine,
            {"BLOCK_S": _pow2(splits), "BLOCK_A": block_a, "HAS_ADAPTER": adapter is not None,
             **common},
        ),
    ]  # fmt: skip
