"""Find the state dict inside a loaded training-checkpoint tree and summarise the rest."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor import keys
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.units import human_bytes


@dataclass
class Entry:
    """A top-level entry of a container that is not the state dict (optimizer, epoch, args)."""

    kind: str  # "optimizer" | "tensors" | "args" | "value" | "dict" | "other"
    summary: str
    tensor_bytes: int = 0
    value: Any = None


@dataclass
class Resolved:
    tensors: dict[str, TensorHandle]
    container_path: tuple[str, ...] = ()
    # The keys that load_state_dict(strict=False) would see if given the loaded object as is.
    top_level_keys: list[str] = field(default_factory=list)
    entries: dict[str, Entry] = field(default_factory=dict)
    args: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def subscripts(container_path: tuple[str, ...]) -> str:
    """The key path as Python indexes it: ``['model']['state_dict']``; "" at the top level."""
    return "".join(f"[{k!r}]" for k in container_path)


def resolve_container(obj: Any) -> Resolved:
    """The state dict wherever it is nested (model, state_dict, module, ...), and the rest."""
    if not isinstance(obj, dict):
        return Resolved({}, notes=[f"the file holds a {type(obj).__name__}, not a dict"])
    out = Resolved({}, top_level_keys=[str(k) for k in obj])
    path = _find_state_dict(obj) or ()
    node: Any = obj
    for k in path:
        node = node[k]
    out.container_path = tuple(path)
    for name, value in node.items():
        if isinstance(value, TensorHandle):
            out.tensors[str(name)] = value.named(str(name))
        else:
            out.notes.append(f"state dict entry {name!r} is a {type(value).__name__}, skipped")
    if path:
        out.entries = {str(k): _summarise(v) for k, v in obj.items() if k != path[0]}
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            out.args = dict(vars(args))
        elif isinstance(args, dict):
            out.args = dict(args)
    return out


def _tensor_count(d: dict) -> int:
    return sum(isinstance(v, TensorHandle) for v in d.values())


def _find_state_dict(obj: dict, depth: int = 0) -> tuple[str, ...] | None:
    if obj and _tensor_count(obj) * 2 > len(obj):
        return ()
    if depth >= 3:
        return None
    # Known nesting keys first, then any other dict that is not optimizer state.
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


def walk_tensors(value: Any) -> tuple[int, int]:
    """(count, bytes) of every tensor inside nested dicts / lists / tuples."""
    if isinstance(value, TensorHandle):
        return 1, value.nbytes
    items: list[Any] = []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    count = size = 0
    for item in items:
        c, s = walk_tensors(item)
        count, size = count + c, size + s
    return count, size


def _summarise(value: Any) -> Entry:
    count, size = walk_tensors(value)
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
        scalars = (int, float, str, bool, type(None))
        plain = {str(k): v for k, v in value.items() if isinstance(v, scalars)}
        shown = ", ".join(f"{k}={v!r}" for k, v in list(plain.items())[:4])
        more = ", ..." if len(value) > 4 else ""
        summary = f"dict: {shown}{more}" if shown else f"dict, {len(value)} entries"
        return Entry("dict", summary, 0, plain)
    return Entry("other", type(value).__name__)
