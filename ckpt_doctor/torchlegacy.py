"""Check a legacy (non-zip) torch pickle against its own bytes before torch.load reads it.

The legacy layout is five pickles back to back (magic number, protocol version, system info,
the object tree, the list of storage keys) followed by one record per storage: an 8-byte
element count, then the bytes. torch.load allocates each storage at the size the object
pickle claims, then fills it from its record. So the claims are checked first, here, with the
same restricted unpickler as zip files (nothing built, nothing imported): every storage and
view the tree uses, the keys list, and that the records are what the pickle says and lie
inside the file. O(storages) seeks; the storage bytes themselves are never read.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from ckpt_doctor import bounds, torchzip
from ckpt_doctor.errors import UnreadableError
from ckpt_doctor.handles import DType

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
_COUNT = struct.Struct("<q")
_HINT = "the file is truncated or damaged; re-copy or re-save it"


class _Storages:
    """The storages the object pickle claims (root key -> dtype, elements), nothing read."""

    def __init__(self, path: Path, file_size: int) -> None:
        self.path = path
        self.file_size = file_size
        self.roots: dict[str, tuple[DType, int]] = {}

    def storage(self, key: str, dtype: DType, numel: int, view: Any) -> torchzip.Storage:
        if numel * dtype.itemsize > self.file_size:
            raise self._bad(f"storage {key!r} claims {numel * dtype.itemsize} bytes")
        known = self.roots.setdefault(key, (dtype, numel))
        if known != (dtype, numel):
            raise self._bad(f"storage {key!r} is declared twice, differently")
        if view is None:
            return torchzip.Storage(dtype, 0, numel * dtype.itemsize, None)
        if not (isinstance(view, tuple) and len(view) == 3):
            raise self._bad(f"storage {key!r} has a malformed view")
        _view_key, offset, size = view
        if not (bounds.is_int(offset) and bounds.is_int(size) and offset >= 0):
            raise self._bad(f"storage {key!r} has a malformed view")
        if size < 0 or offset + size > numel:
            raise self._bad(f"a view of storage {key!r} reaches past its {numel} elements")
        return torchzip.Storage(dtype, 0, size * dtype.itemsize, None)

    def _bad(self, what: str) -> UnreadableError:
        return UnreadableError(f"{self.path}: {what}", hint=_HINT)


def validate(path: Path) -> None:
    """Raise UnreadableError unless the legacy file's claims fit its bytes."""
    size = path.stat().st_size
    storages = _Storages(path, size)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        header = [_plain(mm, path, size) for _ in range(3)]
        if header[0] != _MAGIC or header[1] != _PROTOCOL:
            raise UnreadableError(
                f"{path}: a pickle, but not a torch checkpoint (no legacy torch header)",
                hint="expected a file written by torch.save",
            )
        reader = torchzip.Reader(mm, source=storages, path=path, file_size=size, lenient=True)
        torchzip.run_reader(reader, path)
        keys = _plain(mm, path, size)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise storages._bad("the storage key list is not a list of strings")
        pos = mm.tell()
        for key in keys:
            if key not in storages.roots:
                raise storages._bad(f"storage {key!r} is listed but never used")
            dtype, numel = storages.roots[key]
            if pos + _COUNT.size > size:
                raise storages._bad(f"the record of storage {key!r} is missing (truncated?)")
            (count,) = _COUNT.unpack_from(mm, pos)
            end = pos + _COUNT.size + numel * dtype.itemsize
            if count != numel or end > size:
                raise storages._bad(f"the record of storage {key!r} does not match the pickle")
            pos = end


def _plain(mm: mmap.mmap, path: Path, size: int) -> Any:
    """One of the header pickles: plain values only (any global is refused)."""
    reader = torchzip.Reader(mm, source=None, path=path, file_size=size, lenient=False)
    try:
        return torchzip.run_reader(reader, path)
    except torchzip.Unsupported as exc:
        raise UnreadableError(
            f"{path}: a legacy torch header references {exc}", hint=_HINT
        ) from exc
