"""Inputs for benchmarks/fuzz.py: the seed corpus, seeded mutators, and the payload set.

Seeds are the committed fixtures (fixtures/tiny, fixtures/world) plus layouts built from them
in the work dir: a safetensors base, an HF sharded directory with config.json, a legacy torch
adapter and a safetensors adapter. Mutators are byte-level (flips, smashed integers, cuts,
splices) and structure-aware (the pickle inside a zip re-zipped with a valid CRC, pickle
integers and strings swapped, safetensors headers and JSON configs retyped, index entries
pointed outside the directory, zip archives given duplicate / case-colliding / encrypted /
multi-disk / compressed members or a second archive). The payload set is in fuzz_payloads.py.
"""

from __future__ import annotations

import json
import os
import pickletools
import random
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fixtures.make_fixtures import hf_state_dict  # noqa: E402
from tests.hostile_files import patch_zip_flags  # noqa: E402

INTERESTING = [0, 1, -1, 2, 255, 256, 65535, 2**31 - 1, -(2**31), 2**32, 2**40, -(2**40)]
INTERESTING += [10**8, 2**62, 2**63 - 1, -(2**63), 2**4000]
NAMES = ["layers.100000000.attention.gate", "", "model", "../x", "a" * 5000, "args", "\x00"]
NAMES += ["layers.3.attention.gate", "adapter_query.weight", "optimizer", "__class__"]


@dataclass
class Seed:
    name: str
    path: Path  # a file or a directory
    kind: str  # zip | legacy | safetensors | meta | hf
    role: str  # ckpt (fine-tuned) | base
    partner: str  # the seed it pairs with (its base, or a checkpoint for a base)


def build_seeds(work: Path) -> dict[str, Seed]:
    """Copy the fixtures and build the derived layouts (deterministic)."""
    import torch
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    fx = REPO / "fixtures"
    seeds: dict[str, Seed] = {}
    for world in ("tiny", "world"):
        base = work / f"{world}_base"
        if not base.exists():
            shutil.copytree(fx / world / "base", base)
        ckpt = work / f"{world}_ckpt.pth"
        shutil.copy(fx / world / "checkpoint-4.pth", ckpt)
        seeds[f"{world}_ckpt"] = Seed(f"{world}_ckpt", ckpt, "zip", "ckpt", f"{world}_base")
        seeds[f"{world}_base"] = Seed(f"{world}_base", base, "meta", "base", f"{world}_ckpt")
    sd = torch.load(fx / "tiny" / "base" / "consolidated.00.pth", weights_only=True)
    st = work / "tiny_base.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    seeds["st_base"] = Seed("st_base", st, "safetensors", "base", "tiny_ckpt")
    params = json.loads((fx / "tiny" / "base" / "params.json").read_text())
    hf = work / "tiny_hf"
    hf.mkdir(exist_ok=True)
    hf_sd = hf_state_dict(sd, params["n_heads"])
    names = sorted(hf_sd)
    weight_map = {}
    for i, group in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: hf_sd[k].contiguous() for k in group}, str(hf / fname))
        weight_map.update(dict.fromkeys(group, fname))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"hidden_size": params["dim"], "num_hidden_layers": params["n_layers"]}
    config |= {"num_attention_heads": params["n_heads"], "vocab_size": params["vocab_size"]}
    config |= {"rms_norm_eps": params["norm_eps"]}
    (hf / "config.json").write_text(json.dumps(config))
    seeds["hf_base"] = Seed("hf_base", hf, "hf", "base", "tiny_ckpt")
    ckpt = torch.load(fx / "tiny" / "checkpoint-4.pth", weights_only=False)["model"]
    adapter = {k: v for k, v in ckpt.items() if "gate" in k or "adapter" in k}
    legacy = work / "tiny_adapter_legacy.pth"
    torch.save(adapter, legacy, _use_new_zipfile_serialization=False)
    seeds["legacy_adapter"] = Seed("legacy_adapter", legacy, "legacy", "ckpt", "tiny_base")
    st_adapter = work / "tiny_adapter.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(st_adapter))
    seeds["st_adapter"] = Seed("st_adapter", st_adapter, "safetensors", "ckpt", "tiny_base")
    return seeds


# --------------------------------------------------------------------------- byte level


def _flip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _smash_int(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    value = rng.choice(INTERESTING[:-1])
    width = rng.choice((1, 2, 4, 8))
    raw = (value % (1 << (8 * width))).to_bytes(width, "little")
    at = rng.randrange(max(1, len(b) - width))
    b[at : at + width] = raw
    return bytes(b)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _extend(rng: random.Random, data: bytes) -> bytes:
    tail = rng.randbytes(rng.randint(1, 4096)) if rng.random() < 0.5 else bytes(4096)
    return data + tail


def _splice(rng: random.Random, data: bytes) -> bytes:
    n = rng.randint(1, min(4096, len(data)))
    src, dst = rng.randrange(len(data) - n + 1), rng.randrange(len(data) - n + 1)
    b = bytearray(data)
    b[dst : dst + n] = data[src : src + n]
    if rng.random() < 0.3:  # or cut a chunk out
        del b[dst : dst + n]
    return bytes(b)


BYTE_MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "flip": _flip,
    "smash-int": _smash_int,
    "truncate": _truncate,
    "extend": _extend,
    "splice": _splice,
}


# --------------------------------------------------------------------------- pickles


def _ops(data: bytes) -> list[tuple[Any, Any, int, int]]:
    """(opcode, arg, start, end) of a pickle's opcodes, up to where genops stops."""
    out = []
    try:
        items = list(pickletools.genops(data))
    except Exception:
        return out
    for (op, arg, pos), nxt in zip(items, [*items[1:], (None, None, len(data))], strict=True):
        out.append((op, arg, pos, nxt[2] if nxt[2] is not None else len(data)))
    return out


def _encode_int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"\x8b" + struct.pack("<I", len(raw)) + raw


def mutate_pickle(rng: random.Random, data: bytes) -> bytes:
    """Swap an int or a string for another value (or type), or drop / repeat an opcode."""
    ops = _ops(data)
    if not ops:
        return _flip(rng, data)
    ints = [o for o in ops if o[0].name in ("BININT", "BININT1", "BININT2", "LONG1", "INT")]
    strs = [o for o in ops if o[0].name in ("SHORT_BINUNICODE", "BINUNICODE", "BINSTRING")]
    choice = rng.random()
    if ints and choice < 0.5:
        _, _, a, b = rng.choice(ints)
        swap = rng.random()
        if swap < 0.75:
            new = _encode_int(rng.choice(INTERESTING))
        elif swap < 0.85:
            new = b"G" + struct.pack(">d", rng.choice((0.5, 4.0, 1e8, float("nan"))))
        elif swap < 0.95:
            new = b"N"
        else:
            new = b")"  # an empty tuple where an int was
        return data[:a] + new + data[b:]
    if strs and choice < 0.8:
        _, _, a, b = rng.choice(strs)
        raw = rng.choice(NAMES).encode("utf-8", "surrogatepass")
        return data[:a] + b"X" + struct.pack("<I", len(raw)) + raw + data[b:]
    _, _, a, b = rng.choice(ops[1:-1] or ops)
    return data[:a] + data[b:] if rng.random() < 0.5 else data[:b] + data[a:b] + data[b:]


# --------------------------------------------------------------------------- zips


def _members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _write_zip(path: Path, members: list[tuple[str, bytes]], method: int = 0) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)


def mutate_zip(rng: random.Random, path: Path) -> str:
    """Mutate a torch zip in place, structurally; returns the mutator's name."""
    members = _members(path)
    pkl = next(i for i, (n, _) in enumerate(members) if n.endswith("data.pkl"))
    name, data = members[pkl]
    what = rng.choice(
        ["pickle"] * 6
        + ["storage-cut", "storage-drop", "duplicate", "case", "compressed", "bomb"]
        + ["encrypted", "multidisk", "two-archives", "prefix", "rename"]
    )
    if what == "pickle":
        members[pkl] = (name, mutate_pickle(rng, data))
    elif what == "storage-cut":
        i = rng.choice([i for i, (n, _) in enumerate(members) if "/data/" in n])
        members[i] = (members[i][0], members[i][1][: rng.randrange(len(members[i][1]) + 1)])
    elif what == "storage-drop":
        members = [m for m in members if not m[0].endswith("/data/0")]
    elif what == "duplicate":
        members.append((name, mutate_pickle(rng, data)))
    elif what == "case":
        members.append((name.upper(), mutate_pickle(rng, data)))
    elif what == "rename":
        members[pkl] = (name.replace("data.pkl", "Data.pkl"), data)
    if what in ("pickle", "storage-cut", "storage-drop", "duplicate", "case", "rename"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _write_zip(path, members)
    elif what == "compressed":
        _write_zip(path, members, zipfile.ZIP_DEFLATED)
    elif what == "bomb":  # a member that inflates 1000x
        members.append((name.rsplit("/", 1)[0] + "/extra.pkl", b"\x80\x02N." + bytes(4 << 20)))
        _write_zip(path, members, zipfile.ZIP_DEFLATED)
    elif what in ("encrypted", "multidisk"):
        flags, disk = (1, None) if what == "encrypted" else (0, 1)
        patch_zip_flags(path, name, flags=flags, disk=disk)
    elif what == "two-archives":
        extra = path.with_suffix(".second")
        _write_zip(extra, [(name, mutate_pickle(rng, data))])
        path.write_bytes(path.read_bytes() + extra.read_bytes())
        extra.unlink()
    elif what == "prefix":
        path.write_bytes(rng.randbytes(rng.randint(1, 64)) + path.read_bytes()[4:])
    return f"zip-{what}"


# --------------------------------------------------------------------------- safetensors / JSON


def _retype(rng: random.Random, value: Any) -> Any:
    return rng.choice(
        [
            1e8,
            100000000,
            -1,
            0,
            4.0,
            "4",
            [4],
            {"a": 1},
            None,
            True,
            2**70,
            float("inf"),
            [value, value],
            [[[[]]]],
            [10**6] * 8,
            value,
        ]
    )


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    what = rng.random()
    if what < 0.1:
        return struct.pack("<Q", rng.choice(INTERESTING[:-1]) % 2**64) + data[8:]
    if what < 0.2:
        header = _retype(rng, header)
    elif what < 0.3:
        header[rng.choice(NAMES)] = header.pop(rng.choice(names))
    elif names:
        entry = header[rng.choice(names)]
        field = rng.choice(["dtype", "shape", "data_offsets", "shape"])
        if field == "dtype":
            entry[field] = rng.choice(["F8_E8M0", "f32", "I4", 7, "", "C64", "BF16"])
        elif field == "shape" and entry[field] and rng.random() < 0.6:
            entry[field][rng.randrange(len(entry[field]))] = rng.choice(INTERESTING[:-1])
        elif field == "data_offsets" and rng.random() < 0.6:
            entry[field][rng.randrange(2)] = rng.choice(INTERESTING[:-1])
        else:
            entry[field] = _retype(rng, entry[field])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_json(rng: random.Random, path: Path) -> str:
    value = json.loads(path.read_text())
    what = rng.random()
    if what < 0.2 or not isinstance(value, dict) or not value:
        value = _retype(rng, value)
    elif "weight_map" in value and what < 0.7:
        wm = value["weight_map"]
        key = rng.choice(list(wm))
        wm[key] = rng.choice(
            [
                "../../outside/x.safetensors",
                "/etc/passwd",
                "",
                "sub/../../x",
                "/dev/zero",
                "nonexistent.safetensors",
                "outside-link.safetensors",
                "config.json",
                ".",
            ]
        )
        if wm[key] == "outside-link.safetensors":
            os.symlink("/etc/passwd", path.parent / "outside-link.safetensors")
        if rng.random() < 0.2:
            value["weight_map"] = _retype(rng, wm)
    else:
        key = rng.choice(list(value))
        value[key] = _retype(rng, value[key])
    path.write_text(json.dumps(value))
    return "json"


def mutate_dir(rng: random.Random, seed_kind: str, directory: Path) -> str:
    """Mutate one file of a Meta / HF directory (or the directory's layout)."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    what = rng.random()
    if what < 0.25:
        target = rng.choice([p for p in files if p.suffix == ".json"])
        return "dir-" + mutate_json(rng, target)
    if what < 0.35:
        victim = rng.choice(files)
        layout = rng.choice(["remove", "symlink-out", "as-dir", "fifo", "extra-shard"])
        if layout == "remove":
            victim.unlink()
        elif layout == "symlink-out":
            victim.unlink()
            victim.symlink_to("/etc/passwd")
        elif layout == "as-dir":
            victim.unlink()
            victim.mkdir()
        elif layout == "fifo":
            victim.unlink()
            os.mkfifo(victim)
        elif layout == "extra-shard":
            shutil.copy(rng.choice(files), directory / "consolidated.01.pth")
        return f"dir-{layout}"
    target = rng.choice([p for p in files if p.suffix != ".json"])
    return "dir-" + mutate_file(rng, "zip" if target.suffix == ".pth" else "safetensors", target)


def mutate_file(rng: random.Random, kind: str, path: Path) -> str:
    data = path.read_bytes()
    aware = rng.random() < 0.6
    if kind == "zip" and aware:
        return mutate_zip(rng, path)
    if kind == "safetensors" and aware:
        path.write_bytes(mutate_safetensors(rng, data))
        return "safetensors-header"
    if kind == "legacy" and aware:
        path.write_bytes(mutate_pickle(rng, data))
        return "legacy-pickle"
    name = rng.choice(list(BYTE_MUTATORS))
    path.write_bytes(BYTE_MUTATORS[name](rng, data))
    return name
