"""List the globals a checkpoint's pickles reference, without unpickling anything.

Every checkpoint goes through :func:`check_pickle` before anything loads it: the opcodes are
walked with ``pickletools.genops`` (nothing is imported, called or built) and any global
outside a small allowlist is refused.
"""

from __future__ import annotations

import _compat_pickle
import io
import mmap
import os
import pickletools
from pathlib import Path
from typing import IO

from ckpt_doctor.errors import UnreadableError, UnsafePickleError
from ckpt_doctor.ziparchive import ZipTable, read_table

# What torch's weights_only unpickler accepts, plus argparse.Namespace, which LLaMA-Adapter
# training checkpoints carry under 'args'. Exact "module.name" strings.
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.set",
        "builtins.complex",
        "torch._tensor._rebuild_from_type_v2",
        "argparse.Namespace",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
    }
)
# torch dtype and qscheme names (torch 2.x), written out so that scanning never imports torch
# (importing it costs seconds). A dtype added later is refused until listed here.
_TORCH_VALUES = frozenset(
    [
        "bfloat16",
        "bit",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bool",
        "cdouble",
        "cfloat",
        "chalf",
        "complex128",
        "complex32",
        "complex64",
        "double",
        "float",
        "float16",
        "float32",
        "float4_e2m1fn_x2",
        "float64",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "half",
        "int",
        "int1",
        "int16",
        "int2",
        "int3",
        "int32",
        "int4",
        "int5",
        "int6",
        "int64",
        "int7",
        "int8",
        "long",
        "qint32",
        "qint8",
        "quint2x4",
        "quint4x2",
        "quint8",
        "short",
        "uint1",
        "uint16",
        "uint2",
        "uint3",
        "uint32",
        "uint4",
        "uint5",
        "uint6",
        "uint64",
        "uint7",
        "uint8",
        "per_channel_affine",
        "per_channel_affine_float_qparams",
        "per_channel_symmetric",
        "per_tensor_affine",
        "per_tensor_symmetric",
    ]
)

UNRESOLVED = "<unresolved>.<unresolved>"
_MAX_PICKLES = 5  # torch legacy files: magic number, protocol, sys_info, object, storage keys
# Resource bounds of one file's pickles. A real checkpoint's object pickle has a few opcodes
# per tensor (tens of thousands for a 65B model with optimizer state); a pickle that would
# build millions of objects is claiming memory, not describing weights.
MAX_OPCODES = 1 << 22
MAX_OBJECTS = 1 << 20
_BUILDS = frozenset(
    {"EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "DICT", "LIST", "TUPLE", "TUPLE1", "TUPLE2"}
    | {"TUPLE3", "FROZENSET", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"}
    | {"PERSID", "BINPERSID", "BYTEARRAY8"}
)
_ZIP_MAGIC = b"PK\x03\x04"
_PROTO01_START = frozenset(b"(}])cL")  # protocol 0/1 pickles open without a PROTO opcode
# Opcodes pushing a str (the STRING family pushes bytes only under encoding="bytes").
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
    | {"STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MARK = object()  # a MARK on the simulated stack
_UNKNOWN = object()  # any value whose content we do not track
_NOT_A_CHECKPOINT_HINT = (
    "expected a torch checkpoint (.pt/.pth/.bin, zip or legacy format) or a plain pickle; "
    "re-download or re-save the file"
)


def is_allowed(name: str) -> bool:
    """True when ``name`` ("module.attr") may be referenced by a checkpoint's pickle."""
    if name in ALLOWED_GLOBALS:
        return True
    module, _, attr = name.rpartition(".")
    # Only plain top-level torch attributes: a dotted name could walk anywhere inside torch.
    if module != "torch" or not attr.isidentifier():
        return False
    return attr.endswith("Storage") or attr in _TORCH_VALUES


def referenced_globals(path: str | os.PathLike[str]) -> list[str]:
    """Every global the file's pickles reference, deduplicated, in order of first appearance."""
    names, error = _collect(path)
    if error is not None:
        raise error
    return names


def check_pickle(
    path: str | os.PathLike[str], *, trust: bool = False, table: ZipTable | None = None
) -> list[str]:
    """Return :func:`referenced_globals`; refuse globals outside the allowlist unless trusted.
    ``table``: the zip's member table when the caller parsed it (the loader uses the same)."""
    names, error = _collect(path, table)
    bad = [n for n in names if not is_allowed(n)]
    if bad and not trust:
        # Reported even when the stream is also corrupt: the unpickler runs opcodes in order,
        # so everything before the damage would still have been executed.
        corrupt = " (the stream is also truncated or corrupt)" if error is not None else ""
        raise UnsafePickleError(
            f"{os.fspath(path)}: pickle references globals outside the allowlist: "
            f"{_shown(bad)}; "
            f"nothing was executed{corrupt}",
            globals_found=bad,
            hint="re-run with --trust-pickle only if the file comes from a trusted source: "
            "unpickling it can run arbitrary code",
        )
    if error is not None:
        raise error
    return names


def _shown(names: list[str]) -> str:
    """Names for a message: Python names as they are; anything else (a text file read as a
    pickle, say) is counted, not echoed."""
    plain = [n for n in names if n in (UNRESOLVED,) or _is_dotted_name(n) or n[:1] == "<"]
    odd = len(names) - len(plain)
    return ", ".join([*plain, *([f"{odd} operand(s) that are not Python names"] if odd else [])])


def _is_dotted_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _collect(
    path: str | os.PathLike[str], table: ZipTable | None = None
) -> tuple[list[str], UnreadableError | None]:
    # Globals seen before a scan fails are kept, so check_pickle can still name them.
    found: dict[str, None] = {}
    try:
        _scan_file(os.fspath(path), found, table)
    except UnreadableError as exc:
        return list(found), exc
    return list(found), None


def _scan_file(path: str, found: dict[str, None], table: ZipTable | None) -> None:
    budget = _Budget()
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_ZIP_MAGIC))
            if not head:
                raise UnreadableError(f"{path} is empty", hint=_NOT_A_CHECKPOINT_HINT)
            # torch picks the format from these magic bytes, so dispatch on them too:
            # a pickle with a zip appended is unpickled by torch, so scanned as a pickle.
            if head == _ZIP_MAGIC:
                _scan_zip(path, found, table, budget)
                return
            # mmap: a legacy file can be gigabytes; only its leading pickles are touched.
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _scan_pickles(mm, found, limit=_MAX_PICKLES, what=path, budget=budget)
    except OSError as exc:
        raise UnreadableError(
            f"cannot read {path}: {exc.strerror or exc}", hint="check the path"
        ) from exc


def _scan_zip(path: str, found: dict[str, None], table: ZipTable | None, budget: _Budget) -> None:
    # The member table the loader uses too: one parse, so both read the same pickle.
    table = table or read_table(Path(path))
    # Every .pkl member: torch reads data.pkl, but TorchScript archives hold others.
    members = [m for m in table.members.values() if m.name.endswith(".pkl")]
    if not members:
        raise UnreadableError(
            f"{path} is a zip archive without a .pkl member", hint=_NOT_A_CHECKPOINT_HINT
        )
    for member in members:
        data = table.read(member)
        _scan_pickles(data, found, limit=1, what=f"{path}:{member.name}", budget=budget)


class _Budget:
    """Opcodes and built objects left for one file's pickles (see MAX_OPCODES)."""

    def __init__(self) -> None:
        self.ops = MAX_OPCODES
        self.objects = MAX_OBJECTS


def _scan_pickles(
    buf: bytes | mmap.mmap, found: dict[str, None], *, limit: int, what: str, budget: _Budget
) -> None:
    """Scan up to ``limit`` pickles laid back to back at the start of ``buf``."""
    stream = buf if isinstance(buf, mmap.mmap) else io.BytesIO(buf)
    first = bytes(buf[:2])
    if first[:1] == b"\x80":
        looks_like_pickle = len(first) == 2 and 2 <= first[1] <= 5
    else:
        looks_like_pickle = bool(first) and first[0] in _PROTO01_START
    if not looks_like_pickle:
        raise UnreadableError(
            f"{what} is not a zip archive and not a pickle", hint=_NOT_A_CHECKPOINT_HINT
        )
    # After the first pickle, keep going whatever the next bytes look like (only EOF stops):
    # torch's legacy loader unpickles all five, at any protocol, so skipping one is unsafe.
    for index in range(limit):
        start = stream.tell()
        if index > 0 and start >= len(buf):
            return
        try:
            _scan_one(buf, stream, found, budget)
        except (ValueError, EOFError, OverflowError, UnicodeDecodeError) as exc:
            raise UnreadableError(
                f"{what}: pickle #{index + 1} at byte {start} is truncated or corrupt ({exc})",
                hint="re-download or re-save the checkpoint",
            ) from exc


def _scan_one(
    buf: bytes | mmap.mmap, stream: IO[bytes] | mmap.mmap, found: dict[str, None], budget: _Budget
) -> None:
    """Walk one pickle up to its STOP, simulating just enough stack to resolve STACK_GLOBAL."""
    stack: list[object] = []
    memo = _Memo()
    proto = 0  # what the unpickler assumes until a PROTO opcode says otherwise
    frame_end = prev = -1
    for ops, (op, arg, pos) in enumerate(pickletools.genops(stream), start=1):
        budget.ops -= 1
        budget.objects -= op.name in _BUILDS
        if budget.ops < 0 or budget.objects < 0:
            raise ValueError(
                f"more than {MAX_OPCODES} opcodes or {MAX_OBJECTS} objects: a pickle that "
                "claims that much memory is not a checkpoint"
            )
        # The unpickler grows its memo table to the index it is given: an index beyond the
        # opcodes so far is no pickler's output and would allocate gigabytes.
        if op.name in _PUT_OPS and isinstance(arg, int) and arg > ops:
            raise ValueError(f"memo index {arg} at byte {pos} is beyond any pickler's")
        # The C unpickler drops the in-frame part of a line that runs past its FRAME (pure
        # Python pickle raises), so it would read other names than genops: treat as corrupt.
        if prev < frame_end < pos:
            raise ValueError(f"the opcode at byte {prev} runs past the end of its frame")
        name = op.name
        if name == "FRAME":
            if pos < frame_end:
                raise ValueError(f"the frame at byte {pos} starts inside another frame")
            frame_end = pos + 9 + arg  # 1 opcode byte + 8 length bytes, then the frame
        elif name == "PROTO":
            proto = arg if isinstance(arg, int) else proto
        elif name in ("GLOBAL", "INST"):
            found.setdefault(_qualname(*_inline_pair(buf, pos), proto))
        elif name == "STACK_GLOBAL":
            module, attr = stack[-2:] if len(stack) >= 2 else (None, None)
            if isinstance(module, str) and isinstance(attr, str):
                found.setdefault(_qualname(module, attr, proto))
            else:
                found.setdefault(UNRESOLVED)  # never guess a non-string operand safe
        elif name.startswith("EXT"):
            # copyreg extension codes name a global only at load time: never assume it safe.
            found.setdefault(f"<extension>.{arg}")
        _apply(op, arg, stack, memo)
        prev = pos
    if frame_end > prev + 1:  # a loader could resume the next pickle at the frame's end
        raise ValueError("the last frame runs past STOP")


def _inline_pair(buf: bytes | mmap.mmap, pos: int) -> tuple[str, str]:
    # GLOBAL/INST carry "module\nname\n" after the opcode. genops escape-decodes these lines
    # but the unpickler does not, so read the raw bytes (genops has checked both lines exist).
    mid = buf.find(b"\n", pos + 1)
    end = buf.find(b"\n", mid + 1)
    raw = (bytes(buf[pos + 1 : mid]), bytes(buf[mid + 1 : end]))
    return raw[0].decode("utf-8", "replace"), raw[1].decode("utf-8", "replace")


def _qualname(module: str, name: str, proto: int) -> str:
    # Like pickle's find_class (fix_imports): protocol < 3 pickles name Python 2 modules,
    # e.g. torch.save writes __builtin__.set, which the unpickler loads as builtins.set.
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _apply(op: pickletools.OpcodeInfo, arg: object, stack: list[object], memo: _Memo) -> None:
    """Apply one opcode's stack effect; only strings (and memo copies of them) keep a value."""
    name = op.name
    top = stack[-1] if stack and stack[-1] is not _MARK else _UNKNOWN
    if name in _STRING_OPS:
        stack.append(arg)
    elif name in _PUT_OPS:
        memo.put(arg, top)
    elif name == "MEMOIZE":
        memo.put(memo.size, top)
    elif name in _GET_OPS:
        stack.append(memo.get(arg))
    elif name == "DUP":
        stack.append(top)
    else:
        # Generic: pops and pushes as pickletools documents them (values become unknown).
        before = op.stack_before
        if pickletools.markobject in before:
            while stack and stack.pop() is not _MARK:
                pass
            below = before.index(pickletools.markobject)  # items under the mark, e.g. the list
            del stack[max(0, len(stack) - below) :]
        else:
            del stack[max(0, len(stack) - len(before)) :]
        stack.extend(_MARK if s is pickletools.markobject else _UNKNOWN for s in op.stack_after)


class _Memo:
    """The unpickler's memo as far as the scan needs it: the strings at each index (STACK_GLOBAL
    operands), and which indices are taken (MEMOIZE stores at the count of taken indices),
    as a bitmap: a million PUTs of other objects cost 128 KiB here, not a dict entry each."""

    def __init__(self) -> None:
        self.strings: dict[int, str] = {}
        self.taken = bytearray()
        self.size = 0

    def put(self, index: object, value: object) -> None:
        if not isinstance(index, int) or index < 0:
            return
        byte, bit = divmod(index, 8)
        if byte >= len(self.taken):
            self.taken.extend(bytes(byte + 1 - len(self.taken)))
        if not self.taken[byte] >> bit & 1:
            self.taken[byte] |= 1 << bit
            self.size += 1
        if isinstance(value, str):
            self.strings[index] = value
        else:
            self.strings.pop(index, None)

    def get(self, index: object) -> object:
        return self.strings.get(index, _UNKNOWN) if isinstance(index, int) else _UNKNOWN
