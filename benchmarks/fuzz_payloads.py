"""The payload set of benchmarks/fuzz.py: pickles that run code when unpickled, in every
container a loader might find them in, and the plain-pickle loader that proves they run."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

from fuzz_corpus import REPO  # noqa: F401 - puts the repository on sys.path

from tests.hostile_files import Apply, Asm, Nested, emit


def payload_calls(sentinel: Path, protocol: int) -> dict[str, Any]:
    """Calls that, unpickled by plain pickle, create ``sentinel`` (each by another route)."""
    touch = f"touch {sentinel}"
    py = f"open({str(sentinel)!r}, 'w').close()"
    calls: dict[str, Any] = {
        "os.system": Nested("os", "system", touch),
        "posix.system": Nested("posix", "system", touch),
        "subprocess.call": Nested("subprocess", "call", ["touch", str(sentinel)]),
        "subprocess.Popen": Nested("subprocess", "check_call", ["touch", str(sentinel)]),
        "builtins.eval": Nested("builtins", "eval", py),
        "builtins.exec": Nested("builtins", "exec", py),
        "getattr-chain": Apply(
            Nested("builtins", "getattr", Nested("builtins", "__import__", "os"), "system"),
            touch,
        ),
        "io.open": Nested("io", "open", str(sentinel), "w"),
    }
    if protocol <= 2:  # what torch.save writes: Python 2 names mapped by fix_imports
        calls["__builtin__.eval"] = Nested("__builtin__", "eval", py)
    if protocol >= 4:  # a dotted name under an allowed-looking module
        calls["torch.serialization.os.system"] = Nested("torch.serialization", "os.system", touch)
        calls["argparse._os.system"] = Nested("argparse", "_os.system", touch)
    if protocol in (2, 4):  # torch's own loader, unrestricted, on an inner payload
        evil = payload_pickle(calls["os.system"], 2)
        inner = zip_bytes([("archive/data.pkl", evil), ("archive/version", b"3\n")])
        calls["torch.storage._load_from_bytes"] = Nested("torch.storage", "_load_from_bytes", inner)
    return calls


def payload_pickle(call: Any, protocol: int) -> bytes:
    """{'model': <call>} -- the payload runs while the dict is being built."""
    asm = Asm(protocol)
    asm.raw(b"}" if protocol >= 1 else b"(d")
    asm.str("model")
    emit(asm, call)
    asm.raw(b"s")
    return asm.done()


def legacy_with(main: bytes) -> bytes:
    head = b"".join(
        pickle.dumps(v, protocol=2)
        for v in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001})
    )
    return head + main + pickle.dumps([], protocol=2)


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def payload_containers(evil: bytes, benign: bytes) -> dict[str, bytes]:
    """The same payload pickle in every place a loader might find it."""
    version = ("archive/version", b"3\n")
    return {
        "pickle": evil,
        "legacy": legacy_with(evil),
        "zip": zip_bytes([("archive/data.pkl", evil), version]),
        "zip-extra-pkl": zip_bytes([("archive/data.pkl", benign), ("archive/x.pkl", evil)]),
        "zip-case": zip_bytes([("archive/data.pkl", benign), ("archive/DATA.PKL", evil)]),
        "zip-duplicate": zip_bytes([("archive/data.pkl", benign), ("archive/data.pkl", evil)]),
        "zip-two-archives": zip_bytes([("archive/data.pkl", benign), version])
        + zip_bytes([("archive/data.pkl", evil), version]),
        "pickle-then-zip": evil + zip_bytes([("archive/data.pkl", benign), version]),
        "zip-deflated": _deflated([("archive/data.pkl", evil), version]),
    }


def _deflated(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def plain_load_all(path: Path) -> None:
    """What an unrestricted loader does with the file: every pickle it holds, unpickled with
    plain pickle (persistent ids answered with None). Run in a throwaway process."""

    class Plain(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            return None

    data = path.read_bytes()
    streams = []
    if data[:4] == b"PK\x03\x04" or b"PK\x05\x06" in data[-70000:]:
        at = 0
        while (at := data.find(b"PK\x03\x04", at)) >= 0:  # every local header, every archive
            name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
            method, size = struct.unpack_from("<H", data, at + 8)[0], None
            name = data[at + 30 : at + 30 + name_len]
            start = at + 30 + name_len + extra_len
            if name.lower().endswith(b".pkl"):
                raw = data[start:]
                try:
                    size = zlib.decompressobj(-15).decompress(raw) if method == 8 else raw
                except zlib.error:
                    size = raw
                streams.append(size)
            at += 4
    if data[:4] != b"PK\x03\x04":
        streams.insert(0, data)
    for blob in streams:
        f = io.BytesIO(blob)
        for _ in range(5):
            try:
                Plain(f).load()
            except Exception:
                break
