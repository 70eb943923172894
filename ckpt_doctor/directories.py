"""Checkpoint directory layouts: which names a reader of a directory opens, where they may
lead, and how their JSON files are read.

Every path a directory reader opens stays inside the directory (no ``..``, no absolute index
entries, no symlink leading out), so an index entry of ``/etc/passwd`` is refused by name and
its bytes never reach a message. The one exception is the Hugging Face hub cache, whose
``snapshots/<rev>/`` files are symlinks into the repository's ``blobs/``: there the repository
folder is the boundary. JSON files of the wrong shape are UNREADABLE naming the file.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path, PurePosixPath
from typing import Any

from ckpt_doctor.errors import UnreadableError

# HF layouts, preferred first: safetensors over pickles, full models over PEFT adapters.
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
META_SHARDS = "consolidated.*.pth"
CONFIG_FILES = ("params.json", "config.json", "adapter_config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
# The biggest real index.json (a 405B model) is well under a megabyte.
MAX_JSON_BYTES = 16 << 20


def claimed_name(name: str) -> bool:
    """True when a reader of a checkpoint directory would open a file of this name there."""
    return (
        fnmatch.fnmatchcase(name, META_SHARDS)
        or name in HF_INDEX_FILES
        or name in HF_SINGLE_FILES
        or name in CONFIG_FILES
        or name in TOKENIZER_FILES
    )


def boundary(directory: Path) -> Path:
    """The folder a directory's files must resolve into: the directory itself, or for an HF
    hub cache snapshot (``models--org--name/snapshots/<rev>``) the repository folder."""
    resolved = directory.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.count("--") >= 1:
        return resolved.parent.parent
    return resolved


def inside(directory: Path, relative: Any, *, listed_in: Path | None = None) -> Path:
    """``directory / relative`` once proven to stay inside ``boundary(directory)``; refuses
    absolute paths, ``..``, and symlinks that lead out. ``listed_in``: the index file that
    named it (for the message)."""
    where = f"{listed_in}: " if listed_in else f"{directory}: "
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise UnreadableError(
            f"{where}a file entry is not a file name", hint="fix or re-download the index file"
        )
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or "\\" in relative:
        raise UnreadableError(
            f"{where}entry {_short(relative)!r} points outside the directory",
            hint="index entries must be file names inside the checkpoint directory",
        )
    path = directory / relative
    target = path.resolve()
    if not target.is_relative_to(boundary(directory)):
        raise UnreadableError(
            f"{where}{path.name} leads outside {directory} (a symlink?)",
            hint="copy the file into the checkpoint directory, or pass it directly",
        )
    return path


def read_json_object(path: Path, *, directory: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (params.json, config.json, an index), inside
    ``directory``; anything else is UNREADABLE naming the file."""
    inside(directory, path.name)
    try:
        if not path.is_file():
            raise UnreadableError(f"{path}: not a regular file", hint="expected a JSON file")
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UnreadableError(
                f"{path}: {size} bytes is too big for a config or index file",
                hint="re-download the file; it is damaged or not what its name says",
            )
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UnreadableError(
            f"{path}: cannot be read ({exc.strerror or type(exc).__name__})",
            hint="check the file's permissions",
        ) from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        if isinstance(exc, RecursionError):
            reason = "nested too deeply"
        hint = "re-copy the file or fix its syntax"
        raise UnreadableError(f"{path}: {reason}", hint=hint) from exc
    if not isinstance(value, dict):
        raise UnreadableError(
            f"{path}: holds a JSON {_json_type(value)}, not an object",
            hint="re-copy the file or fix it: it should be a JSON object ({...})",
        )
    return value


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."
