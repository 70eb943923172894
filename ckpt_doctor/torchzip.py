"""Read torch checkpoints' pickles without importing torch, within the file's own bounds.

A torch zip holds ``<root>/data.pkl`` (the object tree; tensors appear as calls to
``torch._utils._rebuild_tensor_v2`` on persistent storage ids) and one uncompressed member
``<root>/data/<key>`` per storage. A restricted unpickler maps the few globals a checkpoint may
use to local stand-ins, so tensors become lazy handles over a read-only memory map of the file
and nothing from torch (or anywhere else) is imported or run. Importing torch costs seconds;
this keeps ``inspect`` and ``diff`` I/O bound.

Every view is checked (bounds.check_view) before it is built, the views of one file share a
budget tied to its size, and the allowed builtins are capped by the file's size too
(``bytearray(3 GiB)`` in a 60-byte pickle is refused, not allocated). Anything this reader does
not model (quantized or sparse tensors, big-endian files) raises ``Unsupported``; the caller
then runs :func:`validate` (the same pass with inert stand-ins, nothing built) and only if that
passes hands the file to torch.load.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import io
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_doctor import bounds
from ckpt_doctor.errors import CkptDoctorError, UnreadableError
from ckpt_doctor.handles import DTYPES, STORAGE_CLASSES, DType, from_array
from ckpt_doctor.ziparchive import ZipTable

# _codecs.encode is how protocol-2 pickles write bytes: a str in latin-1. Other codecs can
# amplify (hex doubles; chained calls would double again and again), so only these.
_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})


class Unsupported(Exception):
    """The file uses something this reader does not model; torch.load can still read it."""


@dataclass(frozen=True)
class _StorageType:
    dtype: DType


@dataclass(frozen=True)
class Storage:
    """One storage: its dtype, its byte range in the file and (when loading) the map."""

    dtype: DType
    start: int
    nbytes: int
    raw: np.ndarray | None  # read-only view of the file map; None when only validating


class Opaque:
    """What an allowed global this reader does not model becomes while validating: it takes
    any arguments and state and builds nothing."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def __call__(self, *_: Any, **__: Any) -> Opaque:
        return Opaque()

    def __setstate__(self, _state: Any) -> None:
        pass


class Reader(pickle.Unpickler):
    """One pass over a checkpoint's object pickle. ``storages`` maps a persistent id's key
    to the storage bytes (``storage(key, dtype, numel)``); ``lenient`` turns the allowed but
    unmodelled globals into Opaque stand-ins instead of raising Unsupported."""

    def __init__(self, file: Any, *, source: Any, path: Path, file_size: int, lenient: bool):
        super().__init__(file)
        self.source = source
        self.path = path
        self.file_size = file_size
        self.lenient = lenient
        self.budget = bounds.ViewBudget(str(path), file_size)
        self.globals: dict[str, Any] = {
            "torch._utils._rebuild_tensor": self.rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self.rebuild_tensor,
            "torch._utils._rebuild_parameter": _first,
            "torch._utils._rebuild_parameter_with_state": _first,
            "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
            "torch.nn.parameter.Parameter": _first,
            "torch.Size": tuple,
            "torch.device": str,
            "torch.serialization._get_layout": str,
            "collections.OrderedDict": OrderedDict,
            "argparse.Namespace": argparse.Namespace,
            "_codecs.encode": _encode,
            "builtins.set": builtins.set,
            "builtins.bytearray": self.bytearray,
            "builtins.complex": builtins.complex,
        }
        if lenient:
            self.globals["collections.Counter"] = collections.Counter

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.globals:
            return self.globals[full]
        if module == "torch" and name in STORAGE_CLASSES:
            return _StorageType(DTYPES[STORAGE_CLASSES[name]])
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        if self.lenient:
            from ckpt_doctor.pickle_scan import is_allowed

            if is_allowed(full):
                return Opaque()
        raise Unsupported(full)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) in (5, 6)):
            raise Unsupported(f"persistent id of {type(pid).__name__}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if isinstance(storage_type, Opaque):
            storage_type = _StorageType(DTYPES["uint8"])
        if not isinstance(storage_type, _StorageType):
            raise Unsupported(f"storage type {type(storage_type).__name__}")
        if not isinstance(key, (str, int)) or isinstance(key, bool) or len(str(key)) > 64:
            raise self._refuse("a storage key is not a short string")
        if not bounds.is_int(numel) or numel < 0:
            raise self._refuse(f"storage {key} has no valid element count")
        view = pid[5] if len(pid) == 6 else None
        return self.source.storage(str(key), storage_type.dtype, numel, view)

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Any:
        """Stand-in for torch._utils._rebuild_tensor(_v2): a checked view, no data read."""
        if isinstance(storage, Opaque):
            raise self._refuse("a tensor's storage is not a storage")
        if not isinstance(storage, Storage):
            raise self._refuse(f"a tensor's storage is a {type(storage).__name__}")
        dtype = storage.dtype
        where = f"{self.path}: a {dtype.name} tensor"
        size, stride, offset = bounds.check_view(
            where,
            size=size,
            stride=stride,
            offset=offset,
            itemsize=dtype.itemsize,
            storage_bytes=storage.nbytes,
        )
        self.budget.take(math.prod(size) * dtype.itemsize, "a tensor")
        if storage.raw is None:
            return Opaque()
        arr = _view(storage.raw, dtype, offset, size, stride)

        def writable() -> np.ndarray:
            return _view(self.source.private(storage), dtype, offset, size, stride)

        return from_array("", arr, dtype, writable=writable)

    def bytearray(self, *args: Any) -> bytearray:
        # bytearray(n) allocates n zero bytes: an allocation no bytes in the file stand for.
        if args and bounds.is_int(args[0]) and not 0 <= args[0] <= self.file_size:
            raise self._refuse(f"bytearray({args[0]}) asks for more bytes than the file holds")
        return builtins.bytearray(*args)

    def _refuse(self, what: str) -> UnreadableError:
        return UnreadableError(
            f"{self.path}: {what}",
            hint="the file is damaged or crafted; re-save it from the training script",
        )


def _view(
    raw: np.ndarray, dtype: DType, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """The checked view over a storage's bytes (check_view proved it lies inside)."""
    base = raw.view(dtype.storage)
    numel = int(np.prod(size, dtype=np.int64)) if size else 1
    if 0 in size:
        return base[:0].reshape(size)
    if stride == _contiguous_strides(size):
        return base[offset : offset + numel].reshape(size)
    # A saved view (a transpose, an expand): exposed as it was, still without copying.
    return np.lib.stride_tricks.as_strided(
        base[offset:], shape=size, strides=[s * dtype.itemsize for s in stride]
    )


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _first(data: Any, *_: Any) -> Any:
    return data  # Parameter rebuilds: the tensor is all that matters here


def _rebuild_from_type(func: Any, _type: Any, args: Any, _state: Any) -> Any:
    if not callable(func) or not isinstance(args, tuple):
        raise TypeError("_rebuild_from_type_v2 needs a callable and an argument tuple")
    return func(*args)


def _encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in _ENCODINGS or errors != "strict":
        raise TypeError("_codecs.encode is allowed for a str in latin-1 or utf-8 only")
    return obj.encode(encoding)


class _Archive:
    """The zip's storages, by key, as views of one read-only map of the file."""

    def __init__(self, path: Path, table: ZipTable, buf: np.ndarray | None) -> None:
        self.path = path
        self.table = table
        self.buf = buf
        self.cache: dict[tuple[str, str], Storage] = {}
        self.cow: dict[int, np.ndarray] = {}

    def storage(self, key: str, dtype: DType, numel: int, view: Any) -> Storage:
        if view is not None:
            raise UnreadableError(
                f"{self.path}: a legacy storage id inside a zip checkpoint",
                hint="the file is damaged or crafted; re-save it",
            )
        if (key, dtype.name) in self.cache:
            return self.cache[(key, dtype.name)]
        member = self.table.members.get(f"{self.table.root}data/{key}")
        if member is None:
            raise UnreadableError(
                f"{self.path}: the pickle uses storage {key!r}, which the archive lacks",
                hint="the file is truncated or damaged; re-save it",
            )
        if member.method != 0 and self.buf is not None:  # validating: torch inflates it
            raise Unsupported("compressed storage")
        nbytes = numel * dtype.itemsize
        if nbytes > member.size:
            raise UnreadableError(
                f"{self.path}: storage {key!r} claims {nbytes} bytes but holds {member.size}",
                hint="the file is truncated or damaged; re-save it",
            )
        raw = None if self.buf is None else self.buf[member.data_start : member.data_start + nbytes]
        storage = Storage(dtype, member.data_start, nbytes, raw)
        self.cache[(key, dtype.name)] = storage
        return storage

    def private(self, storage: Storage) -> np.ndarray:
        """A private copy-on-write map of just this storage's bytes (torch may write)."""
        if storage.start not in self.cow:
            self.cow[storage.start] = private_map(self.path, storage.start, storage.nbytes)
        return self.cow[storage.start]


def private_map(path: Path, start: int, nbytes: int) -> np.ndarray:
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))


def file_map(path: Path) -> np.ndarray:
    """The whole file, mapped read-only and shared: nothing is committed or copied, so a
    file bigger than RAM maps fine and only the pages read are ever touched."""
    return np.memmap(path, dtype=np.uint8, mode="r")


def _unpickle(data: bytes, reader_kwargs: dict[str, Any]) -> Any:
    reader = Reader(io.BytesIO(data), **reader_kwargs)
    return run_reader(reader, reader_kwargs["path"])


def run_reader(reader: Reader, path: Path) -> Any:
    """Run the unpickler; anything it raises on a file's bytes means the file is bad."""
    try:
        return reader.load()
    except (Unsupported, CkptDoctorError):
        raise
    except RecursionError as exc:
        raise UnreadableError(
            f"{path}: the pickle nests too deeply", hint="the file is damaged or crafted"
        ) from exc
    except Exception as exc:  # UnpicklingError, EOFError, TypeError from a stand-in, ...
        first = (str(exc).splitlines() or [""])[0][:200]
        raise UnreadableError(
            f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {first})",
            hint="the file is truncated or corrupt; re-copy or re-save it and compare its size",
        ) from exc


def load(path: Path, table: ZipTable, buf: np.ndarray) -> Any:
    """The object tree of a torch zip checkpoint with TensorHandles in place of tensors."""
    archive = _Archive(path, table, buf)
    return _unpickle(_data_pkl(table), _kwargs(archive, path, table.file_size, False))


def validate(path: Path, table: ZipTable) -> None:
    """Check a zip checkpoint's every storage and view, building nothing: run before
    torch.load is trusted with a file this reader could not load itself."""
    archive = _Archive(path, table, None)
    _unpickle(_data_pkl(table, any_order=True), _kwargs(archive, path, table.file_size, True))


def _kwargs(source: Any, path: Path, size: int, lenient: bool) -> dict[str, Any]:
    return {"source": source, "path": path, "file_size": size, "lenient": lenient}


def _data_pkl(table: ZipTable, *, any_order: bool = False) -> bytes:
    member = table.members.get(table.root + "data.pkl")
    if member is None:
        raise UnreadableError(
            f"{table.path}: a zip archive without {table.root}data.pkl",
            hint="expected a torch checkpoint written by torch.save",
        )
    byteorder = table.members.get(table.root + "byteorder")
    if not any_order and byteorder is not None and table.read(byteorder) != b"little":
        raise Unsupported("big-endian checkpoint")
    return table.read(member)
