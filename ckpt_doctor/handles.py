"""Lazy tensor handles: name, shape, dtype and bytes up front; the data only on demand.

Every reader hands these out instead of state dicts. Values come as numpy views of a read-only,
shared memory map of the file, so a multi-GB (even bigger-than-RAM) checkpoint costs nothing
until a check asks for values, and then only the pages it touches. ``to_torch`` gets its own
copy-on-write map of just that tensor's bytes (torch may write into what it is given). torch
is not needed to read (importing it costs seconds); it is imported only by ``to_torch`` and by
the loaders that genuinely need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ckpt_doctor.errors import UnreadableError

if TYPE_CHECKING:
    import torch

# Elements per chunk when streaming values: 4M elements is 32 MiB in float64.
DEFAULT_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class DType:
    """A tensor dtype by its torch name; ``storage`` is the numpy type holding its bits."""

    name: str
    storage: np.dtype
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def __str__(self) -> str:
        return self.name


def _dt(name: str, storage: str, is_float: bool) -> DType:
    return DType(name, np.dtype(storage), is_float)


# bfloat16 and float8 have no numpy type: their bits travel as unsigned ints.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _dt("float64", "<f8", True),
        _dt("float32", "<f4", True),
        _dt("float16", "<f2", True),
        _dt("bfloat16", "<u2", True),
        _dt("float8_e4m3fn", "u1", True),
        _dt("float8_e5m2", "u1", True),
        _dt("int64", "<i8", False),
        _dt("int32", "<i4", False),
        _dt("int16", "<i2", False),
        _dt("int8", "i1", False),
        _dt("uint8", "u1", False),
        _dt("uint16", "<u2", False),
        _dt("uint32", "<u4", False),
        _dt("uint64", "<u8", False),
        _dt("bool", "?", False),
        _dt("complex64", "<c8", False),
        _dt("complex128", "<c16", False),
    )
}

# torch storage class names (pickled in every torch checkpoint) -> dtype names.
STORAGE_CLASSES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}

SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}


def _e4m3fn_table() -> np.ndarray:
    # float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no Inf, 0x7f/0xff are NaN.
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return sign * value


_E4M3FN = _e4m3fn_table()


def decode(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Raw storage bits -> float64 values (bfloat16 and float8 have no numpy type)."""
    with np.errstate(all="ignore"):  # a signaling NaN in the file is a value, not a warning
        return _decode(raw, dtype)


def _decode(raw: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype.name == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype.name == "float8_e5m2":  # the top byte of a float16
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float64)
    if dtype.name == "float8_e4m3fn":
        return _E4M3FN[raw]
    return raw.astype(np.float64)


@dataclass(frozen=True)
class TensorHandle:
    """One tensor of a checkpoint. ``array()`` gives its raw values (bits in ``dtype.storage``)."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    _array: Callable[[], np.ndarray]
    _rows: Callable[[int, int], np.ndarray] | None = None
    # The same values in writable memory (a private copy-on-write map), for to_torch.
    _writable: Callable[[], np.ndarray] | None = None
    # Dims saved expanded (stride 0): values repeat, so scans read each stored one once.
    expanded: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_float

    def named(self, name: str) -> TensorHandle:
        return replace(self, name=name)

    def array(self) -> np.ndarray:
        """The values as a numpy array of ``dtype.storage``; a view of the file when possible."""
        return self._array()

    def values(self) -> np.ndarray:
        """All values as float64: for small tensors (gates, prompts); stream big ones."""
        return decode(self.array(), self.dtype)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 along dim 0, reading only those."""
        if self._rows is not None:
            return self._rows(start, stop)
        return self.array()[start:stop]

    def stored(self) -> tuple[TensorHandle, int]:
        """The distinct values of an expanded view (its stride-0 dims cut to one element) and
        how often each repeats; ``(self, 1)`` for an ordinary tensor."""
        if not self.expanded:
            return self, 1
        dims = range(len(self.shape))
        index = tuple(slice(0, 1) if i in self.expanded else slice(None) for i in dims)
        repeats = math.prod(self.shape[i] for i in self.expanded)
        return from_array(self.name, self.array()[index], self.dtype), repeats

    def chunks(self, *, max_elems: int = DEFAULT_CHUNK_ELEMS) -> Iterator[np.ndarray]:
        """Flat pieces in row-major order; two handles of one shape chunk identically."""
        if len(self.shape) == 0 or self.numel == 0:
            yield self.array().reshape(-1)
            return
        row_elems = max(1, self.numel // self.shape[0])
        step = max(1, max_elems // row_elems)
        for start in range(0, self.shape[0], step):
            yield self.rows(start, min(start + step, self.shape[0])).reshape(-1)

    def to_torch(self) -> torch.Tensor:
        """A torch tensor sharing the handle's memory where that memory is writable (a private
        copy-on-write map of the file: writes never reach it), else a copy."""
        import torch

        arr = self._writable() if self._writable is not None else self.array()
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = np.array(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if self.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        if self.dtype.name.startswith("float8"):
            return torch.from_numpy(arr).view(getattr(torch, self.dtype.name))
        return torch.from_numpy(arr)


def from_array(
    name: str,
    arr: np.ndarray,
    dtype: DType,
    *,
    writable: Callable[[], np.ndarray] | None = None,
) -> TensorHandle:
    """Wrap a numpy array (typically a view of a memory map); slicing stays a view.
    ``writable`` gives the same values in memory torch may write to (see to_torch)."""
    expanded = tuple(
        i for i, (n, s) in enumerate(zip(arr.shape, arr.strides, strict=True)) if s == 0 and n > 1
    )
    return TensorHandle(name, tuple(arr.shape), dtype, lambda: arr, None, writable, expanded)


def from_torch(name: str, tensor: Any, *, max_bytes: int | None = None) -> TensorHandle:
    """Wrap a torch tensor (legacy pickles, --trust-pickle loads, tests). Raises
    UnreadableError for a dtype with no numpy storage here (complex32, the fnuz float8s), and
    for a sparse tensor whose dense form would exceed ``max_bytes``."""
    import torch

    dtype_name = str(tensor.dtype).removeprefix("torch.")
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise UnreadableError(
            f"tensor {name or '(unnamed)'} has dtype {dtype_name}, which ckpt-doctor cannot read",
            hint="convert the tensor to a standard float dtype and save the checkpoint again",
        )
    t = tensor.detach().cpu()
    if t.layout != torch.strided:  # sparse tensors (rare in checkpoints): checks see values
        dense = math.prod(t.shape) * dtype.itemsize
        if max_bytes is not None and dense > max_bytes:
            raise UnreadableError(
                f"sparse tensor {name or '(unnamed)'} would be {dense} bytes dense, more than "
                "the file could hold",
                hint="the file is damaged or crafted; re-save it",
            )
        t = t.to_dense()
    if dtype.name == "bfloat16":
        t = t.view(torch.int16)
    elif dtype.name.startswith("float8"):
        t = t.view(torch.uint8)
    arr = t.numpy().view(dtype.storage)
    return from_array(name, arr, dtype)


def merged(name: str, parts: list[TensorHandle], dim: int) -> TensorHandle:
    """Tensor-parallel slices (Meta consolidated.NN.pth) concatenated along ``dim``, lazily."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)

    def array() -> np.ndarray:
        return np.concatenate([p.array() for p in parts], axis=dim)

    def rows(a: int, b: int) -> np.ndarray:
        if dim != 0:
            return np.concatenate([p.rows(a, b) for p in parts], axis=dim)
        pieces, offset = [], 0
        for p in parts:
            lo, hi = max(a - offset, 0), min(b - offset, p.shape[0])
            if lo < hi:
                pieces.append(p.rows(lo, hi))
            offset += p.shape[0]
        return np.concatenate(pieces, axis=0)

    return TensorHandle(name, tuple(shape), parts[0].dtype, array, rows)


def rotary_unpermuted(handle: TensorHandle, heads: Callable[[], int]) -> TensorHandle:
    """An HF q_proj / k_proj weight in Meta's rotary layout, lazily (``heads`` is asked only
    when values are read, so names and shapes never need the config).

    HF's LLaMA conversion reorders each head's rows from interleaved (re, im) pairs to two
    halves, ``w.view(h, d/h/2, 2, dim).transpose(1, 2)``; this is the inverse, so that Meta's
    interleaved RoPE sees the rows it was trained with. A weight that is not 2-D is no
    projection: it stays as it is (its shape is reported against the model's)."""
    if len(handle.shape) != 2:
        return handle
    rows, cols = handle.shape

    def array() -> np.ndarray:
        h = heads()
        a = handle.array().reshape(h, 2, rows // h // 2, cols)
        return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(rows, cols)

    return TensorHandle(handle.name, handle.shape, handle.dtype, array, lambda a, b: array()[a:b])
