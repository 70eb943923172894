"""pickle_scan: globals are listed from the opcodes alone and anything unsafe is refused."""

from __future__ import annotations

import argparse
import builtins
import collections
import io
import os
import pickle
import pickletools
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_doctor.errors import UnreadableError, UnsafePickleError
from ckpt_doctor.pickle_scan import (
    ALLOWED_GLOBALS,
    UNRESOLVED,
    check_pickle,
    is_allowed,
    referenced_globals,
)

# os.system pickles as posix.system on Linux (nt.system on Windows).
SYSTEM = f"{os.system.__module__}.{os.system.__name__}"


class _Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __reduce__(self):
        return (builtins.eval, ("1 + 1",))


class _GetattrPayload:
    def __reduce__(self):
        return (builtins.getattr, (collections.OrderedDict, "fromkeys"))


class _Recorder(pickle.Unpickler):
    """Unpickler that records what find_class is asked for and returns a harmless stand-in."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.seen: list[str] = []

    def find_class(self, module: str, name: str) -> object:
        self.seen.append(f"{module}.{name}")
        return tuple


def _state_dict() -> dict[str, torch.Tensor]:
    return {
        "w": torch.randn(4, 4, dtype=torch.float16),
        "b": torch.zeros(4, dtype=torch.bfloat16),
        "p": torch.nn.Parameter(torch.ones(2)),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sbu(text: str) -> bytes:
    """SHORT_BINUNICODE opcode pushing ``text``."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _ops(data: bytes) -> list[str]:
    return [op.name for op, _arg, _pos in pickletools.genops(data)]


def test_zip_checkpoint_globals_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(_state_dict(), path)
    names = referenced_globals(path)
    assert "torch._utils._rebuild_tensor_v2" in names
    assert {"torch.HalfStorage", "torch.BFloat16Storage"} <= set(names)
    assert "torch._utils._rebuild_parameter" in names
    assert all(is_allowed(n) for n in names)
    assert check_pickle(path) == names
    assert len(names) == len(set(names))


def test_zip_with_argparse_namespace(tmp_path: Path) -> None:
    path = tmp_path / "adapter.pth"
    args = argparse.Namespace(adapter_len=10, adapter_layer=30)
    torch.save({"model": _state_dict(), "args": args}, path)
    names = check_pickle(path)
    assert "argparse.Namespace" in names
    assert all(is_allowed(n) for n in names)


@pytest.mark.parametrize("protocol", [1, 2])
def test_legacy_checkpoint_globals_are_allowed(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert not zipfile.is_zipfile(path)
    names = check_pickle(path)
    assert {"torch._utils._rebuild_tensor_v2", "torch.HalfStorage"} <= set(names)
    assert all(is_allowed(n) for n in names)


def test_malicious_zip_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _state_dict(), "x": _Payload(marker)}, path)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [SYSTEM]
    assert SYSTEM in info.value.message
    assert "nothing was executed" in info.value.message
    assert "--trust-pickle" in info.value.hint
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_plain_pickle_is_refused(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with path.open("wb") as fh:
        pickle.dump({"x": _Payload(marker)}, fh, protocol=protocol)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [SYSTEM]
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [1, 2])
def test_malicious_legacy_is_refused(tmp_path: Path, protocol: int) -> None:
    # Protocol 1 has no PROTO opcode: the payload pickle must be scanned all the same.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"model": _state_dict(), "x": _Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [SYSTEM]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "bad"),
    [(_EvalPayload(), "builtins.eval"), (_GetattrPayload(), "builtins.getattr")],
)
def test_builtins_eval_and_getattr_are_refused(tmp_path: Path, payload: object, bad: str) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": payload}, path)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [bad]


def test_trust_returns_globals_without_raising(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload(marker)}, path)
    assert SYSTEM in check_pickle(path, trust=True)
    assert not marker.exists()


def test_pickle_followed_by_zip_is_scanned_as_pickle(tmp_path: Path) -> None:
    # torch picks the format from the leading bytes, so the appended zip must not hide the pickle.
    benign = io.BytesIO()
    torch.save(_state_dict(), benign)
    evil = pickle.dumps(_Payload(tmp_path / "pwned"), protocol=2)
    path = _write(tmp_path / "polyglot.pt", evil + benign.getvalue())
    assert zipfile.is_zipfile(path)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [SYSTEM]


def test_a_duplicate_zip_member_is_refused(tmp_path: Path) -> None:
    # A loader might pick either copy: the archive is refused before either is read.
    path = tmp_path / "dup.pt"
    with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("archive/data.pkl", pickle.dumps(_Payload(tmp_path / "pwned"), protocol=2))
    with pytest.raises(UnreadableError, match="appears twice"):
        check_pickle(path)
    with pytest.raises(UnreadableError, match="appears twice"):
        check_pickle(path, trust=True)


def test_stack_global_resolved_through_memo(tmp_path: Path) -> None:
    # Same global twice: the second STACK_GLOBAL takes both strings from the memo.
    data = (
        b"\x80\x04"
        + _sbu("collections")
        + b"\x94"  # MEMOIZE -> 0
        + _sbu("OrderedDict")
        + b"\x94"  # MEMOIZE -> 1
        + b"\x93\x94"  # STACK_GLOBAL, MEMOIZE -> 2
        + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
        + b"\x86."  # TUPLE2, STOP
    )
    recorder = _Recorder(data)
    recorder.load()
    assert recorder.seen == ["collections.OrderedDict"] * 2
    path = _write(tmp_path / "memo.pkl", data)
    assert check_pickle(path) == ["collections.OrderedDict"]


def test_stack_global_from_real_pickler_memo(tmp_path: Path) -> None:
    data = pickle.dumps([collections.OrderedDict, collections.Counter], protocol=4)
    assert "BINGET" in _ops(data)  # 'collections' comes back from the memo the second time
    path = _write(tmp_path / "memo.pkl", data)
    assert referenced_globals(path) == ["collections.OrderedDict", "collections.Counter"]


def test_stack_global_is_resolved_from_the_stack_not_the_last_strings(tmp_path: Path) -> None:
    # A scanner that takes "the last two strings pushed" would see torch.FloatStorage here.
    data = (
        b"\x80\x04"
        + _sbu(SYSTEM.split(".")[0])
        + _sbu("system")
        + b"("  # MARK
        + _sbu("torch")
        + _sbu("FloatStorage")
        + b"1"  # POP_MARK: drops the decoys
        + b"\x93."  # STACK_GLOBAL, STOP
    )
    recorder = _Recorder(data)
    recorder.load()
    assert recorder.seen == [SYSTEM]
    path = _write(tmp_path / "decoy.pkl", data)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [SYSTEM]


def test_memo_swap_cannot_hide_a_global(tmp_path: Path) -> None:
    data = (
        b"\x80\x04"
        + _sbu(SYSTEM.split(".")[0])
        + b"\x940"  # MEMOIZE -> 0, POP
        + _sbu("system")
        + b"\x940"  # MEMOIZE -> 1, POP
        + _sbu("torch")
        + _sbu("FloatStorage")
        + b"\x930"  # STACK_GLOBAL, POP
        + b"h\x00h\x01\x93."  # BINGET 0, BINGET 1, STACK_GLOBAL, STOP
    )
    recorder = _Recorder(data)
    recorder.load()
    assert recorder.seen == ["torch.FloatStorage", SYSTEM]
    assert referenced_globals(_write(tmp_path / "swap.pkl", data)) == recorder.seen


def test_unresolvable_stack_global_is_refused(tmp_path: Path) -> None:
    data = b"\x80\x04K\x01K\x02\x93."  # BININT1 1, BININT1 2, STACK_GLOBAL, STOP
    path = _write(tmp_path / "odd.pkl", data)
    assert referenced_globals(path) == [UNRESOLVED]
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == [UNRESOLVED]


def test_protocol_2_python2_names_are_mapped_like_the_unpickler(tmp_path: Path) -> None:
    # torch.save (protocol 2) writes builtins as __builtin__.*; pickle loads them as builtins.*.
    path = tmp_path / "set.pt"
    torch.save({"tags": {"a", "b"}, "z": complex(1, 2)}, path)
    with zipfile.ZipFile(path) as zf:
        raw = zf.read(next(n for n in zf.namelist() if n.endswith(".pkl")))
    assert b"__builtin__" in raw
    names = check_pickle(path)
    assert {"builtins.set", "builtins.complex"} <= set(names)


def test_extension_code_is_refused(tmp_path: Path) -> None:
    data = b"\x80\x02\x82\x01."  # EXT1 1: a global looked up in copyreg only at load time
    path = _write(tmp_path / "ext.pkl", data)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == ["<extension>.1"]


def _framed(body: bytes, rest: bytes) -> bytes:
    """Protocol 4 pickle whose single FRAME covers ``body``; ``rest`` follows it."""
    return b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body + rest


@pytest.mark.parametrize(
    ("data", "c_sees"),
    [
        # The frame ends inside the module line: the C unpickler drops "xx" and reads posix.
        (_framed(b"cxx", f"{SYSTEM.split('.')[0]}\nsystem\n.".encode()), SYSTEM),
        (_framed(b"ctorch\nxyz", b"FloatStorage\n."), "torch.FloatStorage"),
    ],
)
def test_line_running_past_a_frame_is_unreadable(tmp_path: Path, data: bytes, c_sees: str) -> None:
    recorder = _Recorder(data)
    recorder.load()
    assert recorder.seen == [c_sees]  # genops would read "xxposix" / "xyzFloatStorage"
    path = _write(tmp_path / "x.pkl", data)
    with pytest.raises(UnreadableError, match="runs past the end of its frame"):
        referenced_globals(path)


def test_frame_running_past_stop_is_unreadable(tmp_path: Path) -> None:
    data = b"\x80\x04\x95" + struct.pack("<Q", 6) + b"N.junk"  # the frame holds "N.junk"
    path = _write(tmp_path / "x.pkl", data)
    with pytest.raises(UnreadableError, match="last frame runs past STOP"):
        referenced_globals(path)


def test_escaped_global_lines_are_read_raw(tmp_path: Path) -> None:
    # genops escape-decodes GLOBAL lines ("tor\x63h" -> "torch"); the unpickler does not.
    data = b"ctor\\x63h\nFloatStorage\n."
    path = _write(tmp_path / "escaped.pkl", data)
    with pytest.raises(UnsafePickleError) as info:
        check_pickle(path)
    assert info.value.globals_found == ["tor\\x63h.FloatStorage"]


@pytest.mark.parametrize(
    "name",
    [
        "torch.FloatStorage",
        "torch.bfloat16",
        "torch.float8_e4m3fn",
        "torch.per_channel_affine",
        "argparse.Namespace",
        "collections.OrderedDict",
    ],
)
def test_is_allowed_accepts(name: str) -> None:
    assert is_allowed(name)


@pytest.mark.parametrize(
    "name",
    [
        SYSTEM,
        "os.system",
        "subprocess.Popen",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "numpy.core.multiarray._reconstruct",
        "torch.load",
        "torch.nn.FloatStorage",
        "torch.serialization.os",
        "torch.x FloatStorage",
        UNRESOLVED,
    ],
)
def test_is_allowed_refuses(name: str) -> None:
    assert not is_allowed(name)
    assert name not in ALLOWED_GLOBALS


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf)
    return buf.getvalue()


def _legacy_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(random.Random(0).randbytes(4096), id="random"),
        pytest.param(b"hello, this is not a checkpoint\n", id="text"),
        pytest.param(_zip_bytes()[: len(_zip_bytes()) // 2], id="truncated-zip"),
        pytest.param(_legacy_bytes()[:300], id="truncated-legacy"),
        pytest.param(
            pickle.dumps({"k": list(range(500))}, protocol=4)[:-200], id="truncated-pickle"
        ),
        pytest.param(pickle.dumps({"k": 1}, protocol=2) + b"\x00junk", id="pickle-then-junk"),
    ],
)
def test_unreadable_files(tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path / "bad.pt", data)
    with pytest.raises(UnreadableError) as info:
        referenced_globals(path)
    assert info.value.hint
    with pytest.raises(UnreadableError):
        check_pickle(path, trust=True)


def test_zip_without_pickle_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(UnreadableError, match=r"\.pkl"):
        referenced_globals(path)


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableError):
        referenced_globals(tmp_path / "nope.pt")
