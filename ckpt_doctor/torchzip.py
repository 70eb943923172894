"""Read torch zip checkpoints without importing torch.

A torch zip holds ``<root>/data.pkl`` (the object tree; tensors appear as calls to
``torch._utils._rebuild_tensor_v2`` on persistent storage ids) and one uncompressed member
``<root>/data/<key>`` per storage. A restricted unpickler maps the few globals a checkpoint may
use to local stand-ins, so tensors become lazy handles over a copy-on-write memory map of the
file and nothing from torch (or anywhere else) is imported or run. Importing torch costs
seconds; this keeps ``inspect`` and ``diff`` I/O bound. Anything unusual (quantized or sparse
tensors, big-endian files) raises ``Unsupported`` and the caller falls back to torch.load.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_doctor.handles import DTYPES, STORAGE_CLASSES, DType, TensorHandle, from_array

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


class Unsupported(Exception):
    """The file uses something this reader does not model; torch.load can still read it."""


@dataclass(frozen=True)
class _StorageType:
    dtype: DType


@dataclass(frozen=True)
class _Storage:
    raw: np.ndarray  # the storage's bytes, a view of the file map
    dtype: DType


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _rebuild_tensor(
    storage: _Storage, offset: int, size: Any, stride: Any, *_: Any
) -> TensorHandle:
    """Stand-in for torch._utils._rebuild_tensor(_v2): a view, no data read."""
    size, stride = tuple(size), tuple(stride)
    dtype = storage.dtype
    base = storage.raw.view(dtype.storage)
    numel = int(np.prod(size, dtype=np.int64))
    if numel == 0:
        arr = base[:0].reshape(size)
    elif stride == _contiguous_strides(size):
        arr = base[offset : offset + numel].reshape(size)
    else:  # a saved view (e.g. a transpose): expose it as it was, still without copying
        arr = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=[s * dtype.itemsize for s in stride]
        )
    return from_array("", arr, dtype)


def _first(data: Any, *_: Any) -> Any:
    return data  # Parameter rebuilds: the tensor is all that matters here


def _rebuild_from_type(func: Any, _type: Any, args: Any, _state: Any) -> Any:
    return func(*args)


_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _first,
    "torch._utils._rebuild_parameter_with_state": _first,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.nn.parameter.Parameter": _first,
    "torch.Size": tuple,
    "torch.device": str,
    "torch.serialization._get_layout": str,
    "collections.OrderedDict": OrderedDict,
    "argparse.Namespace": argparse.Namespace,
    "_codecs.encode": codecs.encode,
    "builtins.set": builtins.set,
    "builtins.bytearray": builtins.bytearray,
    "builtins.complex": builtins.complex,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: _Archive) -> None:
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _GLOBALS:
            return _GLOBALS[full]
        if module == "torch" and name in STORAGE_CLASSES:
            return _StorageType(DTYPES[STORAGE_CLASSES[name]])
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        raise Unsupported(full)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise Unsupported(f"persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType):
            raise Unsupported(f"storage type {storage_type!r}")
        return self.archive.storage(str(key), storage_type.dtype)


class _Archive:
    """The zip's members, mapped once; storages are typed views into that map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)
        pkl = [n for n in self.zip.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise Unsupported("no single data.pkl")
        self.root = pkl[0][: -len("data.pkl")]
        byteorder = self.root + "byteorder"
        if byteorder in self.zip.namelist() and self.zip.read(byteorder) != b"little":
            raise Unsupported("big-endian checkpoint")
        self.map = np.memmap(path, dtype=np.uint8, mode="c")
        self.cache: dict[tuple[str, str], _Storage] = {}

    def storage(self, key: str, dtype: DType) -> _Storage:
        if (key, dtype.name) in self.cache:
            return self.cache[(key, dtype.name)]
        info = self.zip.getinfo(f"{self.root}data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise Unsupported("compressed storage")
        with self.path.open("rb") as f:
            f.seek(info.header_offset)
            sig, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self.map.size:
            raise zipfile.BadZipFile(f"{info.filename} runs past the end of the file")
        storage = _Storage(self.map[start : start + info.file_size], dtype)
        self.cache[(key, dtype.name)] = storage
        return storage

    def load(self) -> Any:
        with self.zip.open(self.root + "data.pkl") as f:
            return _Unpickler(f, self).load()


def load(path: Path) -> Any:
    """The object tree of a torch zip checkpoint with TensorHandles in place of tensors."""
    return _Archive(path).load()
