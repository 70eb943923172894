"""safetensors files: read with every claim checked, written straight into a given file.

Reading: the header is parsed here, with every claim checked (its length against the file,
each entry's dtype, shape and offsets, offsets tiling the data region exactly, shape x
itemsize = byte range), and then by the safetensors library too, before anything is mapped.
The file is mapped read-only and shared, so a file bigger than RAM opens and only what is read
is touched.

Writing: :func:`save` writes the format itself into the path it is given, because the
library's save_file writes a temporary file beside its target and renames it, which defeats
the anonymous temp file atomic.write_atomically hands out (a /proc/self/fd path).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckpt_doctor import bounds
from ckpt_doctor.errors import UnreadableError
from ckpt_doctor.handles import DTYPES, SAFETENSORS_DTYPES, TensorHandle, from_array
from ckpt_doctor.torchzip import file_map, private_map

if TYPE_CHECKING:
    import torch

_HEADER_LEN = struct.Struct("<Q")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_HINT = "the file is truncated or not safetensors; re-copy or re-save it"


def _bad(path: Path, what: str) -> UnreadableError:
    return UnreadableError(f"{path}: corrupt safetensors header ({what})", hint=_HINT)


def read_header(path: Path, size: int) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, metadata, data start) of a safetensors file, all claims checked."""
    if size < _HEADER_LEN.size:
        raise _bad(path, "shorter than its 8-byte length field")
    with path.open("rb") as f:
        (n,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
        if n > min(size - _HEADER_LEN.size, MAX_HEADER_BYTES):
            raise _bad(path, f"a header of {n} bytes in a file of {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _bad(path, "the header is not valid UTF-8 JSON") from exc
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ is not a map of strings to strings")
    data_start = _HEADER_LEN.size + n
    _check_entries(path, header, size - data_start)
    return header, metadata, data_start


def _check_entries(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {_short(name)!r} is not {{dtype, shape, data_offsets}}")
        dtype = DTYPES.get(SAFETENSORS_DTYPES.get(info["dtype"], "")) if isinstance(
            info["dtype"], str
        ) else None  # fmt: skip
        if dtype is None:
            raise UnreadableError(
                f"{path}: tensor {_short(name)} has dtype {_short(str(info['dtype']))}, which "
                "ckpt-doctor cannot read",
                hint="convert the file to a standard float dtype",
            )
        shape = bounds.int_tuple(info["shape"], f"{path}: {_short(name)}", "the shape")
        offsets = bounds.int_tuple(info["data_offsets"], f"{path}: {_short(name)}", "offsets")
        if any(d < 0 for d in shape) or len(offsets) != 2:
            raise _bad(path, f"entry {_short(name)!r} has a negative dim or not 2 offsets")
        lo, hi = offsets
        if not 0 <= lo <= hi <= data_bytes:
            raise _bad(path, f"{_short(name)} spans bytes {lo}..{hi} of {data_bytes}")
        if math.prod(shape) * dtype.itemsize != hi - lo:
            raise _bad(path, f"{_short(name)}: shape {list(shape)} is not {hi - lo} bytes")
        spans.append((lo, hi))
    end = 0
    for lo, hi in sorted(spans):
        if lo != end:
            raise _bad(path, "tensors overlap or leave gaps in the data")
        end = hi
    if end != data_bytes:
        raise _bad(path, f"the data is {data_bytes} bytes but the tensors cover {end}")


def read_safetensors(path: Path, size: int) -> tuple[dict[str, TensorHandle], dict[str, str]]:
    """Lazy handles over a read-only map of the file, and its metadata."""
    header, metadata, start = read_header(path, size)
    try:
        # The library's own validation too: what it refuses, nothing downstream can load.
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:  # SafetensorError and friends: a bad header either way
        first = (str(exc).splitlines() or [""])[0][:200]
        raise _bad(path, first or type(exc).__name__) from exc
    data = file_map(path) if header else None
    tensors: dict[str, TensorHandle] = {}
    for name, info in header.items():
        dtype = DTYPES[SAFETENSORS_DTYPES[info["dtype"]]]
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        arr = data[start + lo : start + hi].view(dtype.storage).reshape(shape)

        def writable(lo: int = lo, hi: int = hi, shape: tuple = shape, d=dtype) -> np.ndarray:
            return private_map(path, start + lo, hi - lo).view(d.storage).reshape(shape)

        tensors[name] = from_array(name, arr, dtype, writable=writable)
    return tensors, metadata


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def save(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as safetensors into ``path`` (opened and written in place), laid out as
    the library lays them out: widest dtype first, then by name, the header space-padded to a
    multiple of 8 bytes."""
    import torch

    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        dtype = names[str(t.dtype).removeprefix("torch.")]
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(_HEADER_LEN.pack(len(raw)) + raw)
        for name in order:
            flat = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(flat.numpy().data)
