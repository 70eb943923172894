"""One entry point, ``open_checkpoint``, for every checkpoint layout ckpt-doctor reads.

Readers return lazy tensor handles (see handles.py), never whole state dicts. Every pickle is
scanned for the globals it references before anything is unpickled; zip checkpoints are then
read by torchzip (a memory map, no torch import), safetensors through a memory map of the
validated header's offsets. torch.load is the fallback for legacy pickles and exotic content,
and sees a file only after the same checks passed on it (torchzip.validate, torchlegacy).

The bounded-reader contract (bounds.py) holds for every layout: each number a file claims is
checked against the bytes that exist before anything is allocated or mapped; readers of a
directory only open files inside it (directories.py); every file a checkpoint was read
from is listed in ``read_files``, so writers can refuse to overwrite any of them.
"""

from __future__ import annotations

import functools
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_doctor import bounds, directories, keys, torchlegacy, torchzip
from ckpt_doctor.containers import Entry, check_tree, resolve_container, subscripts
from ckpt_doctor.directories import HF_INDEX_FILES, HF_SINGLE_FILES
from ckpt_doctor.errors import EmptyFileError, UnreadableError
from ckpt_doctor.handles import TensorHandle, merged, rotary_unpermuted
from ckpt_doctor.pickle_scan import check_pickle, is_allowed
from ckpt_doctor.safetensors_format import read_safetensors
from ckpt_doctor.torchload import torch_load
from ckpt_doctor.units import human_bytes
from ckpt_doctor.ziparchive import read_table

__all__ = ["HF_INDEX_FILES", "HF_SINGLE_FILES", "Checkpoint", "Entry", "open_checkpoint"]


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
    # A PEFT adapter's adapter_config.json (in its directory, or beside the weights file).
    adapter_json: dict[str, Any] | None = None
    # Every file the reader opened (shards, params / config / index JSON); see inputs().
    read_files: list[Path] = field(default_factory=list)

    @property
    def container_subscripts(self) -> str:
        """Where the weights are: ``['model']`` (checkpoint['model']); "" at the top level."""
        return subscripts(self.container_path)

    @property
    def prefix(self) -> keys.PrefixRewrite | None:
        """Wrapper segments and namespace prefixes on the saved names (None: none)."""
        return keys.detect_prefix(self.tensors)

    def canonical(self) -> dict[str, TensorHandle]:
        """Tensors under the names and in the layout the analysis uses (keys.canonical_name):
        wrapper segments and namespace prefixes removed, HF names mapped, HF's rotary row order
        of q/k undone. Two saved names that end up the same name are refused."""
        out: dict[str, TensorHandle] = {}
        saved: dict[str, str] = {}
        for name, handle in self.tensors.items():
            canon = keys.canonical_name(name)
            if canon in saved:
                raise UnreadableError(
                    f"{self.path}: tensors {saved[canon]!r} and {name!r} are both {canon!r} once "
                    "wrappers and prefixes are removed; ckpt-doctor cannot tell which one the "
                    "model uses",
                    hint="save the model's own state dict once (unwrap DDP / FSDP / compile)",
                )
            saved[canon] = name
            rotary = keys.hf_rotary(keys.model_name(name))
            if rotary is not None:
                heads = functools.partial(self._hf_heads, rotary, handle)
                handle = rotary_unpermuted(handle, heads)
            out[canon] = handle
        return out

    def _hf_heads(self, which: str, handle: TensorHandle) -> int:
        """Heads of an HF q_proj / k_proj: config.json's, else LLaMA's head_dim of 128."""
        params = self.params or {}
        heads = params.get("n_kv_heads" if which == "k" else "n_heads") or params.get("n_heads")
        if not heads and handle.shape[0] % (2 * keys.LLAMA_HEAD_DIM) == 0:
            heads = handle.shape[0] // keys.LLAMA_HEAD_DIM
        if not heads or handle.shape[0] % (2 * heads):
            raise UnreadableError(
                f"{self.path}: {handle.name} is an HF rotary-ordered weight of {handle.shape[0]} "
                "rows, and without config.json its head count is unknown",
                hint="put the model's config.json (num_attention_heads) beside the weights",
            )
        return heads

    def upstream_view(self) -> dict[str, TensorHandle | None]:
        """What upstream's ``load_state_dict(torch.load(path), strict=False)`` is given: the
        top-level entries as saved (a container's own keys, which hold no tensors)."""
        if self.container_path:
            return dict.fromkeys(self.top_level_keys)
        return dict(self.tensors)

    def borrow_params(self, base: Checkpoint | None) -> Checkpoint:
        """A fine-tune without a config of its own has its base's shape: take the base's
        params (HF's head count for its rotary layout, the layer count...)."""
        if self.params is None and base is not None and base.params is not None:
            self.params = dict(base.params)
        return self

    def inputs(self) -> list[Path]:
        """What a command that writes must never overwrite: every file read, the tokenizer,
        and the checkpoint path itself (a directory protects the names its layout reads)."""
        paths = [self.path, *self.files, *self.read_files]
        if self.tokenizer_path is not None:
            paths.append(self.tokenizer_path)
        return list(dict.fromkeys(paths))

    @property
    def total_bytes(self) -> int:
        return sum(h.nbytes for h in self.tensors.values())

    def close(self) -> None:
        # Handles hold the file maps; dropping them lets the maps close.
        self.tensors = {}
        self.entries = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a file or directory lazily. Raises UnreadableError / UnsafePickleError."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows a symlink the user passed: its target is the input
    except FileNotFoundError:
        raise UnreadableError(
            f"{path}: no such file or directory", hint="check the path (and the current dir)"
        ) from None
    except OSError as exc:
        raise _os_error(path, exc) from exc
    try:
        if stat.S_ISDIR(mode):
            ckpt = _open_dir(path, trust_pickle=trust_pickle)
        elif stat.S_ISREG(mode):
            ckpt = _open_file(path, trust_pickle=trust_pickle)
        else:  # a FIFO would block forever, a device never ends
            raise UnreadableError(
                f"{path}: not a regular file or directory",
                hint="point ckpt-doctor at a checkpoint file or a model directory",
            )
    except OSError as exc:  # a file that vanished, a permission, a directory named like a file
        raise _os_error(Path(exc.filename or path), exc) from exc
    bounds.check_names(str(ckpt.path), list(ckpt.tensors))
    return _with_sidecars(ckpt, path if stat.S_ISDIR(mode) else path.parent)


def _os_error(path: Path, exc: OSError) -> UnreadableError:
    return UnreadableError(
        f"{path}: cannot be read ({exc.strerror or type(exc).__name__})",
        hint="check that the path is a readable checkpoint file or directory",
    )


def _with_sidecars(ckpt: Checkpoint, folder: Path) -> Checkpoint:
    """The config files that travel with weights: a single Meta or HF weights file reads the
    params.json / config.json beside it (the model's shape, HF's head count for its rotary
    layout); a PEFT adapter its adapter_config.json. Each is read as the directory readers
    read theirs (inside the folder, the right JSON shape) and listed in read_files."""
    if ckpt.params is None and ckpt.format != "meta-dir":
        params_file = folder / "params.json"
        if params_file.is_file():
            params = directories.read_json_object(params_file, directory=folder)
            ckpt.read_files.append(params_file)
            ckpt.params = bounds.check_params(
                str(params_file), params, tensor_bytes=ckpt.total_bytes
            )
        elif (folder / "config.json").is_file():
            ckpt.params = _hf_params(folder, ckpt)
    config = folder / "adapter_config.json"
    if ckpt.adapter_json is None and config.is_file():
        ckpt.adapter_json = directories.read_json_object(config, directory=folder)
        ckpt.read_files.append(config)
    return ckpt


def _open_file(path: Path, *, trust_pickle: bool) -> Checkpoint:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a FIFO in a directory would block forever
        raise UnreadableError(
            f"{path}: not a regular file", hint="replace it with the checkpoint file itself"
        )
    size = info.st_size
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
        tensors, metadata = read_safetensors(path, size)
        ckpt = Checkpoint(path, "safetensors", tensors, files=[path], metadata=metadata)
        ckpt.top_level_keys = list(tensors)
        ckpt.read_files = [path]
        return ckpt
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return _open_torch(path, trust_pickle=trust_pickle, zipped=False)
    # Never echo the bytes: the path may be any file at all (/etc/passwd, a key).
    raise UnreadableError(
        f"{path}: not a checkpoint (expected a torch zip, a legacy torch pickle or "
        "safetensors; its first bytes are none of these)",
        hint="point ckpt-doctor at a .pth/.pt/.bin/.safetensors file or a model directory",
    )


def _open_torch(path: Path, *, trust_pickle: bool, zipped: bool) -> Checkpoint:
    table = read_table(path) if zipped else None  # one parse: the scan and the load use it
    found = check_pickle(path, trust=trust_pickle, table=table)  # raises unless allowed/trusted
    safe = all(is_allowed(g) for g in found)
    ckpt = Checkpoint(path, "torch-zip" if zipped else "torch-legacy", {}, files=[path])
    ckpt.pickle_globals = found
    ckpt.read_files = [path]
    obj = None
    try:
        if zipped and safe:
            try:
                obj = torchzip.load(path, table, torchzip.file_map(path))
            except torchzip.Unsupported as exc:
                ckpt.notes.append(f"read with torch.load ({exc} needs torch's own reader)")
                torchzip.validate(path, table)  # torch sees the file only if this passes
        elif safe:
            torchlegacy.validate(path)
    except torchzip.Unsupported as exc:
        raise UnreadableError(
            f"{path}: uses {exc}, which cannot be checked before loading",
            hint="re-save the checkpoint with a current torch.save; --trust-pickle skips the "
            "checks only for files you trust",
        ) from exc
    if obj is None:
        obj = torch_load(path, found, safe=safe, zipped=zipped)
    if not zipped:
        ckpt.notes.append(
            "legacy (non-zip) torch pickle: cannot be memory-mapped, so it was read into RAM "
            f"(about {human_bytes(path.stat().st_size)})"
        )
    check_tree(obj, str(path))
    resolved = resolve_container(obj)
    ckpt.tensors = resolved.tensors
    ckpt.container_path = resolved.container_path
    ckpt.top_level_keys = resolved.top_level_keys
    ckpt.entries = resolved.entries
    ckpt.args = resolved.args
    ckpt.notes += resolved.notes
    return ckpt


def _open_dir(path: Path, *, trust_pickle: bool) -> Checkpoint:
    shards = sorted(path.glob(directories.META_SHARDS))
    if shards:
        shards = [directories.inside(path, s.name) for s in shards]
        return _open_meta_dir(path, shards, trust_pickle=trust_pickle)
    for index in HF_INDEX_FILES:
        if (path / index).exists():
            return _open_hf_sharded(path, path / index, trust_pickle=trust_pickle)
    for single in HF_SINGLE_FILES:
        if (path / single).exists():
            ckpt = _open_file(directories.inside(path, single), trust_pickle=trust_pickle)
            ckpt.params = _hf_params(path, ckpt)
            ckpt.tokenizer_path = find_tokenizer(path)
            return ckpt
    raise UnreadableError(
        f"{path}: no checkpoint files found in this directory",
        hint="expected consolidated.NN.pth + params.json (Meta), model.safetensors"
        ".index.json (HF sharded) or model.safetensors; or pass the file itself",
    )


def _open_meta_dir(path: Path, shards: list[Path], *, trust_pickle: bool) -> Checkpoint:
    parts = [_open_file(s, trust_pickle=trust_pickle) for s in shards]
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
        tensors[name] = pieces[0] if dim is None else _merged(path, name, pieces, dim)
    ckpt = Checkpoint(path, "meta-dir", tensors, files=shards)
    ckpt.top_level_keys = list(tensors)
    ckpt.pickle_globals = sorted({g for p in parts for g in p.pickle_globals})
    ckpt.notes += [n for p in parts for n in p.notes]
    ckpt.read_files = list(shards)
    if len(parts) > 1:
        ckpt.notes.append(f"{len(parts)} tensor-parallel shards merged lazily")
    params_file = path / "params.json"
    if params_file.exists():
        params = directories.read_json_object(params_file, directory=path)
        ckpt.read_files.append(params_file)
        ckpt.params = bounds.check_params(str(params_file), params, tensor_bytes=ckpt.total_bytes)
    else:
        ckpt.notes.append("no params.json beside the shards; model facts come from shapes")
    _check_meta_shards(ckpt, shards)
    ckpt.tokenizer_path = find_tokenizer(path)
    return ckpt


def _merged(path: Path, name: str, pieces: list[TensorHandle], dim: int) -> TensorHandle:
    """Tensor-parallel slices, once their shapes agree everywhere but along ``dim``."""
    shapes = {p.shape[:dim] + p.shape[dim + 1 :] for p in pieces if len(p.shape) > dim}
    if len(shapes) != 1 or any(len(p.shape) <= dim for p in pieces):
        raise UnreadableError(
            f"{path}: the shards' slices of {name} do not fit together "
            f"({', '.join(str(list(p.shape)) for p in pieces)})",
            hint="all consolidated.NN.pth shards must come from the same checkpoint",
        )
    if len({p.dtype for p in pieces}) != 1:
        raise UnreadableError(
            f"{path}: the shards' slices of {name} have different dtypes",
            hint="all consolidated.NN.pth shards must come from the same checkpoint",
        )
    return merged(name, pieces, dim)


def _check_meta_shards(ckpt: Checkpoint, shards: list[Path]) -> None:
    """A missing consolidated.NN.pth leaves every split tensor narrow: the merged embedding
    must be as wide as the model (params.json's dim, else the replicated norm's length)."""
    emb, norm = ckpt.tensors.get("tok_embeddings.weight"), ckpt.tensors.get("norm.weight")
    norm_dim = norm.shape[0] if norm is not None and len(norm.shape) == 1 else None
    dim = (ckpt.params or {}).get("dim") or norm_dim
    if emb is None or len(emb.shape) != 2 or not dim or emb.shape[1] == dim:
        return
    raise UnreadableError(
        f"{ckpt.path}: the model is {dim} wide but the {len(shards)} shard(s) "
        f"({', '.join(s.name for s in shards)}) give tok_embeddings {emb.shape[1]} columns: "
        "tensor-parallel shards are missing",
        hint="copy every consolidated.NN.pth of the checkpoint into the directory",
    )


def _open_hf_sharded(path: Path, index: Path, *, trust_pickle: bool) -> Checkpoint:
    weight_map = directories.read_json_object(index, directory=path).get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UnreadableError(
            f"{index}: weight_map is not a map of tensor names to file names",
            hint="the index file is damaged; re-download it",
        )
    files = sorted(set(weight_map.values()))
    paths = {f: directories.inside(path, f, listed_in=index) for f in files}
    missing = [f for f in files if not paths[f].exists()]
    if missing:
        raise UnreadableError(
            f"{path}: shard(s) listed in {index.name} are missing: {', '.join(missing[:10])}",
            hint="download or copy the missing shard files into the directory",
        )
    opened = {f: _open_file(paths[f], trust_pickle=trust_pickle) for f in files}
    tensors: dict[str, TensorHandle] = {}
    for name, f in weight_map.items():
        if name not in opened[f].tensors:
            raise UnreadableError(
                f"{paths[f]}: has no tensor {name!r} although {index.name} maps it there",
                hint="the index and the shards come from different saves; re-download them",
            )
        tensors[name] = opened[f].tensors[name]
    ckpt = Checkpoint(path, "hf-sharded", tensors, files=[paths[f] for f in files])
    ckpt.top_level_keys = list(tensors)
    ckpt.read_files = [index, *ckpt.files]
    ckpt.params = _hf_params(path, ckpt)
    ckpt.tokenizer_path = find_tokenizer(path)
    return ckpt


def _hf_params(path: Path, ckpt: Checkpoint) -> dict[str, Any] | None:
    """Meta-style params from an HF config.json, when there is one (checked like params.json)."""
    config = path / "config.json"
    if not config.exists():
        return None
    c = directories.read_json_object(config, directory=path)
    ckpt.read_files.append(config)
    mapping = {
        "dim": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "vocab_size": "vocab_size",
        "norm_eps": "rms_norm_eps",
        "ffn_hidden": "intermediate_size",
        "head_dim": "head_dim",
        "hidden_act": "hidden_act",
        "attention_bias": "attention_bias",
        "mlp_bias": "mlp_bias",
        "model_type": "model_type",
    }
    params = {k: c[v] for k, v in mapping.items() if v in c}
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; 4.x rope_theta and
    # rope_scaling beside it.
    rope = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}
    theta = rope.get("rope_theta", c.get("rope_theta"))
    if theta is not None:
        params["rope_theta"] = theta
    scaling = c.get("rope_scaling") or {}
    kind = rope.get("rope_type") or (
        scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    )
    if kind not in (None, "default"):
        params["rope_scaling"] = kind
    return bounds.check_params(str(config), params, tensor_bytes=ckpt.total_bytes)


def find_tokenizer(path: Path) -> Path | None:
    """``tokenizer.model`` (or ``tokenizer.json``) beside the checkpoint or one level up."""
    here = path if path.is_dir() else path.parent
    for folder in (here, here.parent):
        for name in ("tokenizer.model", "tokenizer.json"):
            if (folder / name).is_file():
                return folder / name
    return None
