"""The files ckpt-doctor hands to torch.load: legacy (non-zip) pickles once their claims are
checked, zips that need torch's own reader, and any file under --trust-pickle. weights_only
unless the user trusts the file; every tensor of the result becomes a lazy handle."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ckpt_doctor import bounds
from ckpt_doctor.containers import check_tree
from ckpt_doctor.errors import UnreadableError, UnsafePickleError
from ckpt_doctor.handles import from_torch


def namespace_allowed() -> contextlib.AbstractContextManager[Any]:
    """weights_only loading with argparse.Namespace allowed (training checkpoints pickle their
    args): scoped from torch 2.5; torch 2.4 only has the process-wide allowlist."""
    import argparse

    import torch

    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def torch_load(path: Path, found: list[str], *, safe: bool, zipped: bool) -> Any:
    """torch.load with weights_only unless the user opted in; tensors become handles."""
    import pickle

    import torch

    try:
        if safe:
            with namespace_allowed():
                obj = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
        else:  # --trust-pickle: the user said this file is theirs
            obj = torch.load(path, map_location="cpu", mmap=zipped, weights_only=False)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UnsafePickleError(
                f"{path}: torch's weights_only loader refused it: {_first_line(exc)}",
                globals_found=found,
                hint="re-run with --trust-pickle only if you trust where the file came from",
            ) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # RuntimeError, EOFError, AssertionError, ...: torch says no
        raise _unreadable(path, exc) from exc
    check_tree(obj, str(path))
    limit = bounds.VIEW_RATIO * path.stat().st_size + bounds.VIEW_SLACK
    try:
        return _handles_in(obj, torch.Tensor, limit)
    except UnreadableError as exc:  # a dtype it cannot read: say in which file
        raise UnreadableError(f"{path}: {exc.message}", hint=exc.hint) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _unreadable(path: Path, exc: BaseException) -> UnreadableError:
    return UnreadableError(
        f"{path}: cannot be read as a torch checkpoint ({_first_line(exc)})",
        hint="the file is truncated or corrupt; re-copy or re-save it and compare its size",
    )


def _handles_in(value: Any, tensor_type: type, limit: int, where: str = "") -> Any:
    """Replace every tensor in a loaded tree by a handle, keeping the structure; ``where`` is
    the key path so far (names a tensor whose dtype cannot be read). check_tree bounded the
    depth and size of the tree first."""
    if isinstance(value, tensor_type):
        return from_torch(where, value, max_bytes=limit)
    if isinstance(value, dict):
        return type(value)(
            (k, _handles_in(v, tensor_type, limit, f"{where}.{k}" if where else str(k)))
            for k, v in value.items()
        )
    if isinstance(value, (list, tuple)):
        return type(value)(
            _handles_in(v, tensor_type, limit, f"{where}[{i}]") for i, v in enumerate(value)
        )
    return value
