"""One entry point, ``open_checkpoint``, for every checkpoint layout ckpt-doctor reads.

Readers return lazy tensor handles (see handles.py), never whole state dicts: zip pickles are
opened with ``torch.load(mmap=True, weights_only=True)``, safetensors through ``safe_open``.
Every pickle is scanned for the globals it references before anything is unpickled.
"""

from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ckpt_doctor import keys
from ckpt_doctor.errors import EmptyFileError, UnreadableError, UnsafePickleError
from ckpt_doctor.handles import TensorHandle, from_safetensors, from_tensor, merged
from ckpt_doctor.pickle_scan import check_pickle, is_allowed
from ckpt_doctor.units import human_bytes


@dataclass
class Entry:
    """A top-level entry of a container that is not the state dict (optimizer, epoch, args)."""

    kind: str  # "optimizer" | "tensors" | "args" | "value" | "dict" | "other"
    summary: str
    tensor_bytes: int = 0
    value: Any = None


@dataclass
class Checkpoint:
    """What a checkpoint holds, as handles plus facts about where they were found."""

    path: Path
    format: str  # torch-zip | torch-legacy | safetensors | hf-sharded | meta-dir
    tensors: dict[str, TensorHandle]
    container_path: tuple[str, ...] = ()
    # The keys that load_state_dict(strict=False) would see if given the loaded object as is.
    top_level_keys: list[str] = field(default_factory=list)
    entries: dict[str, Entry] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    files: list[Path] = field(default_factory=list)
    pickle_globals: list[str] = field(default_factory=list)
    tokenizer_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    _closers: list[Any] = field(default_factory=list, repr=False)

    @property
    def prefix(self) -> keys.PrefixRewrite | None:
        return keys.detect_prefix(self.tensors)

    def canonical(self) -> dict[str, TensorHandle]:
        """Tensors under the names the model uses: known prefixes stripped, HF names mapped."""
        rewrite = self.prefix
        out: dict[str, TensorHandle] = {}
        for name, handle in self.tensors.items():
            name = keys.strip_prefix(name, rewrite.prefix) if rewrite else name
            out[keys.hf_to_meta(name) or name] = handle
        return out

    @property
    def total_bytes(self) -> int:
        return sum(h.nbytes for h in self.tensors.values())

    def close(self) -> None:
        for closer in self._closers:
            closer.__exit__(None, None, None)
        self._closers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a file or directory lazily. Raises UnreadableError / UnsafePickleError."""
    path = Path(path)
    if not path.exists():
        raise UnreadableError(
            f"{path}: no such file or directory", hint="check the path (and the current dir)"
        )
    if path.is_dir():
        return _open_dir(path, trust_pickle=trust_pickle)
    return _open_file(path, trust_pickle=trust_pickle)


def _open_file(path: Path, *, trust_pickle: bool) -> Checkpoint:
    size = path.stat().st_size
    if size == 0:
        raise EmptyFileError(
            f"{path}: the file is empty (0 bytes)",
            hint="the save was interrupted or the disk filled up; save the checkpoint again",
        )
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return _open_torch(path, trust_pickle=trust_pickle, zipped=True)
    if len(head) >= 9 and head[8:9] == b"{":
        return _open_safetensors(path)
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return _open_torch(path, trust_pickle=trust_pickle, zipped=False)
    raise UnreadableError(
        f"{path}: not a checkpoint (starts with {head[:8]!r}; expected a torch zip, a legacy "
        "torch pickle or safetensors)",
        hint="point ckpt-doctor at a .pth/.pt/.bin/.safetensors file or a model directory",
    )


def _torch_load(path: Path, *, trust_pickle: bool, zipped: bool) -> tuple[Any, list[str]]:
    """Scan the pickle's globals, then load with weights_only unless the user opted in."""
    found = check_pickle(path, trust=trust_pickle)  # raises unless allowed or trusted
    try:
        if all(is_allowed(g) for g in found):
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
        else:  # --trust-pickle: the user said this file is theirs
            obj = torch.load(path, map_location="cpu", mmap=zipped, weights_only=False)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UnsafePickleError(
                f"{path}: torch's weights_only loader refused it: {str(exc).splitlines()[0]}",
                globals_found=found,
                hint="re-run with --trust-pickle only if you trust where the file came from",
            ) from exc
        raise _unreadable(path, exc) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc
    return obj, found


def _unreadable(path: Path, exc: BaseException) -> UnreadableError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UnreadableError(
        f"{path}: cannot be read as a torch checkpoint ({first})",
        hint="the file is truncated or corrupt; re-copy or re-save it and compare its size",
    )


def _open_torch(path: Path, *, trust_pickle: bool, zipped: bool) -> Checkpoint:
    obj, found = _torch_load(path, trust_pickle=trust_pickle, zipped=zipped)
    ckpt = Checkpoint(path, "torch-zip" if zipped else "torch-legacy", {}, files=[path])
    ckpt.pickle_globals = found
    if not zipped:
        ckpt.notes.append(
            f"legacy (non-zip) torch pickle: cannot be memory-mapped, so it was read into RAM "
            f"(about {path.stat().st_size / 2**20:.0f} MiB)"
        )
    _resolve_container(ckpt, obj)
    return ckpt


def _resolve_container(ckpt: Checkpoint, obj: Any) -> None:
    """Find the state dict wherever it is nested and summarise everything else."""
    if not isinstance(obj, dict):
        ckpt.notes.append(f"the file holds a {type(obj).__name__}, not a dict of tensors")
        return
    ckpt.top_level_keys = [str(k) for k in obj]
    path = _find_state_dict(obj)
    if path is None:
        path = ()
    node: Any = obj
    for k in path:
        node = node[k]
    ckpt.container_path = tuple(path)
    for name, value in node.items():
        if isinstance(value, torch.Tensor):
            ckpt.tensors[str(name)] = from_tensor(str(name), value)
        else:
            ckpt.notes.append(f"state dict entry {name!r} is a {type(value).__name__}, skipped")
    if path:
        for k, value in obj.items():
            if k != path[0]:
                ckpt.entries[str(k)] = _summarise(str(k), value)
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            ckpt.args = dict(vars(args))
        elif isinstance(args, dict):
            ckpt.args = dict(args)


def _tensor_share(d: dict) -> int:
    return sum(isinstance(v, torch.Tensor) for v in d.values())


def _find_state_dict(obj: dict, depth: int = 0) -> tuple[str, ...] | None:
    if obj and _tensor_share(obj) * 2 > len(obj):
        return ()
    if depth >= 3:
        return None
    candidates = [k for k in keys.NESTING_KEYS if isinstance(obj.get(k), dict)]
    candidates += [
        k
        for k, v in obj.items()
        if isinstance(v, dict) and k not in candidates and k not in keys.OPTIMIZER_KEYS
    ]
    for k in candidates:
        sub = _find_state_dict(obj[k], depth + 1)
        if sub is not None:
            return (str(k), *sub)
    return None


def _walk_tensors(value: Any) -> tuple[int, int]:
    """(count, bytes) of every tensor inside nested dicts / lists / tuples."""
    if isinstance(value, torch.Tensor):
        return 1, value.numel() * value.element_size()
    items: list[Any] = []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    count = size = 0
    for item in items:
        c, s = _walk_tensors(item)
        count, size = count + c, size + s
    return count, size


def _summarise(key: str, value: Any) -> Entry:
    count, size = _walk_tensors(value)
    if isinstance(value, argparse.Namespace):
        return Entry("args", f"argparse.Namespace with {len(vars(value))} fields", 0, vars(value))
    if isinstance(value, dict) and "state" in value and "param_groups" in value:
        groups = value.get("param_groups") or [{}]
        settings = {k: v for k, v in groups[0].items() if k != "params"}
        return Entry(
            "optimizer",
            f"optimizer state for {len(value['state'])} params, {count} tensors, "
            f"{human_bytes(size)}",
            size,
            settings,
        )
    if count:
        return Entry("tensors", f"{count} tensors, {human_bytes(size)}", size)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return Entry("value", repr(value), 0, value)
    if isinstance(value, dict):
        plain = _plain(value)
        shown = ", ".join(f"{k}={v!r}" for k, v in list(plain.items())[:4])
        more = ", ..." if len(value) > 4 else ""
        return Entry(
            "dict", f"dict: {shown}{more}" if shown else f"dict, {len(value)} entries", 0, plain
        )
    return Entry("other", type(value).__name__)


def _plain(d: dict) -> dict:
    return {str(k): v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _open_safetensors(path: Path) -> Checkpoint:
    try:
        handle = safe_open(str(path), framework="pt")
        handle.__enter__()
        tensors = {name: from_safetensors(name, handle) for name in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise UnreadableError(
            f"{path}: corrupt safetensors header ({exc})",
            hint="the file is truncated or not safetensors; re-copy or re-save it",
        ) from exc
    ckpt = Checkpoint(path, "safetensors", tensors, files=[path], metadata=metadata)
    ckpt.top_level_keys = list(tensors)
    ckpt._closers.append(handle)
    return ckpt


def _open_dir(path: Path, *, trust_pickle: bool) -> Checkpoint:
    shards = sorted(path.glob("consolidated.*.pth"))
    if shards:
        return _open_meta_dir(path, shards, trust_pickle=trust_pickle)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return _open_hf_sharded(path, index)
    for single in ("model.safetensors", "adapter_model.safetensors"):
        if (path / single).exists():
            ckpt = _open_safetensors(path / single)
            ckpt.params = _hf_params(path)
            return ckpt
    raise UnreadableError(
        f"{path}: no checkpoint files found in this directory",
        hint="expected consolidated.NN.pth + params.json (Meta), model.safetensors"
        ".index.json (HF sharded) or model.safetensors; or pass the file itself",
    )


def _open_meta_dir(path: Path, shards: list[Path], *, trust_pickle: bool) -> Checkpoint:
    parts = [_open_torch(s, trust_pickle=trust_pickle, zipped=_is_zip(s)) for s in shards]
    names = list(parts[0].tensors)
    for s, p in zip(shards[1:], parts[1:], strict=True):
        if set(p.tensors) != set(names):
            raise UnreadableError(
                f"{s}: holds different tensor names than {shards[0].name}",
                hint="all consolidated.NN.pth shards must come from the same checkpoint",
            )
    tensors: dict[str, TensorHandle] = {}
    for name in names:
        dim = keys.meta_shard_dim(name) if len(parts) > 1 else None
        pieces = [p.tensors[name] for p in parts]
        tensors[name] = pieces[0] if dim is None else merged(name, pieces, dim)
    ckpt = Checkpoint(path, "meta-dir", tensors, files=shards)
    ckpt.top_level_keys = list(tensors)
    ckpt.pickle_globals = sorted({g for p in parts for g in p.pickle_globals})
    ckpt.notes += [n for p in parts for n in p.notes]
    if len(parts) > 1:
        ckpt.notes.append(f"{len(parts)} tensor-parallel shards merged lazily")
    params_file = path / "params.json"
    if params_file.exists():
        ckpt.params = _read_json(params_file)
    else:
        ckpt.notes.append("no params.json beside the shards; model facts come from shapes")
    ckpt.tokenizer_path = find_tokenizer(path)
    return ckpt


def _open_hf_sharded(path: Path, index: Path) -> Checkpoint:
    weight_map: dict[str, str] = _read_json(index).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise UnreadableError(
            f"{path}: shard(s) listed in {index.name} are missing: {', '.join(missing)}",
            hint="download or copy the missing shard files into the directory",
        )
    opened = {f: _open_safetensors(path / f) for f in files}
    tensors: dict[str, TensorHandle] = {}
    for name, f in weight_map.items():
        if name not in opened[f].tensors:
            raise UnreadableError(
                f"{path / f}: has no tensor {name!r} although {index.name} maps it there",
                hint="the index and the shards come from different saves; re-download them",
            )
        tensors[name] = opened[f].tensors[name]
    ckpt = Checkpoint(path, "hf-sharded", tensors, files=[path / f for f in files])
    ckpt.top_level_keys = list(tensors)
    ckpt._closers = [c for o in opened.values() for c in o._closers]
    ckpt.params = _hf_params(path)
    ckpt.tokenizer_path = find_tokenizer(path)
    return ckpt


def _hf_params(path: Path) -> dict[str, Any] | None:
    """Meta-style params from an HF config.json, when there is one."""
    config = path / "config.json"
    if not config.exists():
        return None
    c = _read_json(config)
    mapping = {
        "dim": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "vocab_size": "vocab_size",
        "norm_eps": "rms_norm_eps",
        "ffn_hidden": "intermediate_size",
    }
    return {k: c[v] for k, v in mapping.items() if v in c}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableError(
            f"{path}: not valid JSON ({exc})", hint="re-copy the file or fix its syntax"
        ) from exc


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def find_tokenizer(path: Path) -> Path | None:
    """``tokenizer.model`` (or ``tokenizer.json``) beside the checkpoint or one level up."""
    here = path if path.is_dir() else path.parent
    for folder in (here, here.parent):
        for name in ("tokenizer.model", "tokenizer.json"):
            if (folder / name).exists():
                return folder / name
    return None
