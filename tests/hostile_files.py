"""Builders of small hostile / damaged checkpoint files, written byte by byte in a test's
tmp_path (no committed binaries). Shared by tests/test_hostile*.py, tests/test_fuzz*.py and
benchmarks/fuzz.py.

The torch zip and legacy builders write what torch.save writes, but with any offset, size,
stride, storage key or element count, so a test can claim what a damaged or crafted file
would claim.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass
class Storage:
    """A storage: its torch class name (FloatStorage...), key, claimed element count, bytes."""

    key: str
    data: bytes
    cls: str = "FloatStorage"
    numel: int | None = None  # what the pickle claims; default: len(data) // itemsize

    def claimed(self) -> int:
        sizes = {"FloatStorage": 4, "HalfStorage": 2, "LongStorage": 8, "ByteStorage": 1}
        return self.numel if self.numel is not None else len(self.data) // sizes[self.cls]


@dataclass
class Tensor:
    """A _rebuild_tensor_v2 call: storage, offset, size, stride as the pickle will say them."""

    storage: Storage
    size: Any
    stride: Any
    offset: Any = 0


@dataclass
class _Global:
    """Pickled as GLOBAL module.name (nothing is imported when pickling)."""

    module: str
    name: str


@dataclass
class Call:
    """Pickled as REDUCE: ``func(*args)`` with func a global by name."""

    module: str
    name: str
    args: tuple = ()
    state: Any = field(default=None)


class _Pickler(pickle._Pickler):  # the Python pickler: save_global can be steered per object
    def __init__(self, file: Any, protocol: int, legacy: bool) -> None:
        super().__init__(file, protocol=protocol)
        self.legacy = legacy

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            cls = _Global("torch", obj.cls)
            if self.legacy:
                return ("storage", cls, obj.key, "cpu", obj.claimed(), None)
            return ("storage", cls, obj.key, "cpu", obj.claimed())
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
            args = (obj.storage, obj.offset, obj.size, obj.stride, False, OrderedDict())
            return (_Caller(rebuild), args)
        if isinstance(obj, Call):
            if obj.state is None:
                return (_Caller(_Global(obj.module, obj.name)), obj.args)
            return (_Caller(_Global(obj.module, obj.name)), obj.args, obj.state)
        return NotImplemented

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, _Caller):
            self._write_global(obj.target)
            return
        if isinstance(obj, _Global):
            self._write_global(obj)
            return
        super().save(obj, save_persistent_id)

    def _write_global(self, g: _Global) -> None:
        if self.proto >= 4:
            self.save(g.module)
            self.save(g.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())


@dataclass
class _Caller:
    target: _Global

    def __call__(self, *args: Any) -> Any:  # save_reduce wants a callable; never called
        raise NotImplementedError


def dumps(obj: Any, *, protocol: int = 2, legacy: bool = False) -> bytes:
    """Pickle ``obj`` where Tensor / Call / Storage stand for torch's own calls and ids."""
    buf = io.BytesIO()
    _Pickler(buf, protocol, legacy).dump(obj)
    return buf.getvalue()


def global_call(module: str, name: str, *args: Any, protocol: int = 2) -> bytes:
    """A pickle that calls module.name(*args) when loaded (REDUCE)."""
    return dumps(Call(module, name, args), protocol=protocol)


def storages_in(obj: Any) -> list[Storage]:
    found: dict[str, Storage] = {}

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            found.setdefault(v.storage.key, v.storage)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(obj)
    return list(found.values())


def torch_zip(
    path: Path,
    obj: Any,
    *,
    root: str = "archive",
    protocol: int = 2,
    extra: list[tuple[str, bytes]] | None = None,
    pickle_bytes: bytes | None = None,
) -> Path:
    """A torch zip checkpoint: root/data.pkl, root/byteorder, root/data/<key> (stored)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", pickle_bytes or dumps(obj, protocol=protocol))
        zf.writestr(f"{root}/byteorder", b"little")
        zf.writestr(f"{root}/version", b"3\n")
        for s in storages_in(obj):
            zf.writestr(f"{root}/data/{s.key}", s.data)
        for name, data in extra or []:
            zf.writestr(name, data)
    return path


def legacy(path: Path, obj: Any, *, keys: list[str] | None = None, protocol: int = 2) -> Path:
    """A legacy (non-zip) torch file: magic, protocol, sys_info, object, keys, records."""
    storages = storages_in(obj)
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, out, protocol=protocol)
    out.write(dumps(obj, protocol=protocol, legacy=True))
    listed = keys if keys is not None else [s.key for s in storages]
    pickle.dump(listed, out, protocol=protocol)
    by_key = {s.key: s for s in storages}
    for key in listed:
        s = by_key.get(key)
        if s is not None:
            out.write(struct.pack("<q", s.claimed()) + s.data)
    path.write_bytes(out.getvalue())
    return path


def safetensors_file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    """A safetensors file with exactly this header (no validation of what it claims)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def patch_zip_flags(path: Path, member: str, *, flags: int = 0, disk: int | None = None) -> None:
    """OR ``flags`` into a member's local and central headers; set its central disk number."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    struct.pack_into("<H", data, info.header_offset + 6, info.flag_bits | flags)
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + name_len] == member.encode():
            break
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<H", data, central + 8, info.flag_bits | flags)
    if disk is not None:
        struct.pack_into("<H", data, central + 34, disk)
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- raw pickle code


class Asm:
    """A tiny pickle assembler: globals, strings, tuples and calls at any protocol 0-5, so a
    payload is exactly the opcodes a test means (no pickler decides for it)."""

    def __init__(self, protocol: int) -> None:
        self.protocol = protocol
        self.out = bytearray(b"\x80" + bytes([protocol]) if protocol >= 2 else b"")

    def str(self, text: str) -> Asm:
        raw = text.encode("utf-8")
        if self.protocol == 0:
            self.out += b"V" + text.encode("raw-unicode-escape") + b"\n"
        elif self.protocol >= 4 and len(raw) < 256:
            self.out += b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
        else:
            self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE
        return self

    def int(self, value: int) -> Asm:
        if self.protocol == 0 or not -(2**31) <= value < 2**31:
            if self.protocol >= 2:
                raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1
            else:
                self.out += b"I" + str(value).encode() + b"\n"
        else:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        return self

    def glob(self, module: str, name: str) -> Asm:
        if self.protocol >= 4:
            self.str(module).str(name)
            self.out += b"\x93"  # STACK_GLOBAL
        else:
            self.out += b"c" + f"{module}\n{name}\n".encode()
        return self

    def mark(self) -> Asm:
        self.out += b"("
        return self

    def tuple(self) -> Asm:
        """Close a tuple opened with mark()."""
        self.out += b"t"
        return self

    def list(self) -> Asm:
        self.out += b"l"
        return self

    def reduce(self) -> Asm:
        self.out += b"R"
        return self

    def raw(self, data: bytes) -> Asm:
        self.out += data
        return self

    def done(self) -> bytes:
        return bytes(self.out) + b"."


def call(asm: Asm, module: str, name: str, *args: Any) -> Asm:
    """Emit module.name(*args) (str / int / nested (module, name, args) calls)."""
    asm.glob(module, name).mark()
    for a in args:
        emit(asm, a)
    return asm.tuple().reduce()


def emit(asm: Asm, value: Any) -> None:
    if isinstance(value, str):
        asm.str(value)
    elif isinstance(value, bytes) and asm.protocol >= 3:
        asm.raw(b"B" + struct.pack("<I", len(value)) + value)  # BINBYTES
    elif isinstance(value, bytes):  # how protocols 0-2 write bytes
        call(asm, "_codecs", "encode", value.decode("latin-1"), "latin1")
    elif isinstance(value, int):
        asm.int(value)
    elif isinstance(value, list):
        asm.mark()
        for v in value:
            emit(asm, v)
        asm.list()
    elif isinstance(value, Nested):
        call(asm, value.module, value.name, *value.args)
    elif isinstance(value, Apply):
        emit(asm, value.func)
        asm.mark()
        for v in value.args:
            emit(asm, v)
        asm.tuple().reduce()
    else:
        raise TypeError(type(value))


@dataclass
class Nested:
    module: str
    name: str
    args: tuple = ()

    def __init__(self, module: str, name: str, *args: Any) -> None:
        self.module, self.name, self.args = module, name, args


@dataclass
class Apply:
    """func(*args) where func is itself the result of a call (a getattr chain)."""

    func: Any
    args: tuple = ()

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args
