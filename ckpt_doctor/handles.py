"""Lazy tensor handles: name, shape, dtype and bytes up front; the data only on demand.

Every reader hands these out instead of state dicts, so a multi-GB checkpoint costs nothing
until a check asks for values, and then only one bounded chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Elements per chunk when streaming values: 4M elements is 32 MiB in float64.
DEFAULT_CHUNK_ELEMS = 1 << 22

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class TensorHandle:
    """One tensor of a checkpoint. ``rows(a, b)`` reads only rows a..b-1 along dim 0."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    _load: Callable[[], torch.Tensor]
    _rows: Callable[[int, int], torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def load(self) -> torch.Tensor:
        return self._load()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._rows(start, stop)

    def chunks(self, *, max_elems: int = DEFAULT_CHUNK_ELEMS) -> Iterator[torch.Tensor]:
        """Flat pieces in row-major order; two handles of one shape chunk identically."""
        if len(self.shape) == 0 or self.numel == 0:
            yield self.load().reshape(-1)
            return
        row_elems = max(1, self.numel // self.shape[0])
        step = max(1, max_elems // row_elems)
        for start in range(0, self.shape[0], step):
            yield self.rows(start, min(start + step, self.shape[0])).reshape(-1)


def from_tensor(name: str, tensor: torch.Tensor) -> TensorHandle:
    """Wrap an already-materialised (typically mmap-backed) tensor; slicing is a view."""
    return TensorHandle(
        name,
        tuple(tensor.shape),
        tensor.dtype,
        lambda: tensor,
        lambda a, b: tensor[a:b],
    )


def from_safetensors(name: str, handle: object) -> TensorHandle:
    """Wrap a key of an open ``safe_open`` handle; nothing is read until asked."""
    sl = handle.get_slice(name)  # type: ignore[attr-defined]
    dtype_name = sl.get_dtype()
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"unsupported safetensors dtype {dtype_name} for {name}")
    shape = tuple(sl.get_shape())
    return TensorHandle(
        name,
        shape,
        dtype,
        lambda: handle.get_tensor(name),  # type: ignore[attr-defined]
        lambda a, b: sl[a:b],
    )


def merged(name: str, parts: list[TensorHandle], dim: int) -> TensorHandle:
    """Tensor-parallel slices (Meta consolidated.NN.pth) concatenated along ``dim``, lazily."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)

    def load() -> torch.Tensor:
        return torch.cat([p.load() for p in parts], dim=dim)

    def rows(a: int, b: int) -> torch.Tensor:
        if dim != 0:
            return torch.cat([p.rows(a, b) for p in parts], dim=dim)
        pieces, offset = [], 0
        for p in parts:
            lo, hi = max(a - offset, 0), min(b - offset, p.shape[0])
            if lo < hi:
                pieces.append(p.rows(lo, hi))
            offset += p.shape[0]
        return torch.cat(pieces, dim=0)

    return TensorHandle(name, tuple(shape), parts[0].dtype, load, rows)
