"""Find the state dict inside a loaded training-checkpoint tree and summarise the rest.

The tree comes from a file, so it may be anything a pickle can build: :func:`check_tree` bounds
its depth and size (cycles and shared references included) before anything walks it, and
values are shown through :func:`label`, which never fails and never prints pages.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor import keys
from ckpt_doctor.errors import UnreadableError
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.units import human_bytes

# A checkpoint's tree is a few levels deep (dict -> state dict -> tensor; optimizer state ->
# per-param dicts). The node bound counts shared references each time they are reached, so a
# "billion laughs" of lists referencing lists is refused before anything walks it.
MAX_TREE_DEPTH = 100
MAX_TREE_NODES = 1 << 21
_LABEL_CHARS = 80


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


def check_tree(obj: Any, where: str) -> None:
    """Refuse a loaded tree deeper than MAX_TREE_DEPTH or with more than MAX_TREE_NODES
    entries counted along every path (a cycle never ends, so it is refused too)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_TREE_DEPTH or nodes > MAX_TREE_NODES:
            what = "nests deeper than" if depth > MAX_TREE_DEPTH else "has more entries than"
            limit = MAX_TREE_DEPTH if depth > MAX_TREE_DEPTH else MAX_TREE_NODES
            raise UnreadableError(
                f"{where}: the pickled object {what} {limit} (self-referencing or crafted)",
                hint="the file is damaged or crafted; re-save it from the training script",
            )
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = list(value)
        elif isinstance(value, argparse.Namespace):
            children = list(vars(value).values())
        else:
            continue
        stack.extend((c, depth + 1) for c in children)


def label(value: Any) -> str:
    """A short display form of any value: huge ints and long reprs are cut, never raised."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int beyond the digit limit inside a container
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 3] + "..."


def _key(value: Any) -> str:
    return value if isinstance(value, str) else label(value)


def _args(values: dict[Any, Any]) -> dict[str, Any]:
    """args as a dict of str keys; an integer no training script could pass is refused."""
    out = {}
    for k, v in values.items():
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
            raise UnreadableError(
                f"args.{_key(k)} is a {v.bit_length()}-bit integer",
                hint="the file is damaged or crafted; re-save it from the training script",
            )
        out[_key(k)] = v
    return out


def resolve_container(obj: Any) -> Resolved:
    """The state dict wherever it is nested (model, state_dict, module, ...), and the rest."""
    if not isinstance(obj, dict):
        return Resolved({}, notes=[f"the file holds a {type(obj).__name__}, not a dict"])
    out = Resolved({}, top_level_keys=[_key(k) for k in obj])
    path = _find_state_dict(obj) or ()
    node: Any = obj
    for k in path:
        node = node[k]
    out.container_path = tuple(_key(k) for k in path)
    for name, value in node.items():
        if isinstance(value, TensorHandle):
            out.tensors[_key(name)] = value.named(_key(name))
        else:
            kind = type(value).__name__
            out.notes.append(f"state dict entry {label(name)} is a {kind}, skipped")
    if path:
        out.entries = {_key(k): _summarise(v) for k, v in obj.items() if k != path[0]}
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            out.args = _args(vars(args))
        elif isinstance(args, dict):
            out.args = _args(args)
    return out


def _tensor_count(d: dict) -> int:
    return sum(isinstance(v, TensorHandle) for v in d.values())


def _find_state_dict(obj: dict, depth: int = 0) -> tuple[Any, ...] | None:
    """The key path (the keys themselves) of the dict that holds the tensors."""
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
            return (k, *sub)
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
    scalars = (int, float, str, bool, type(None))
    if isinstance(value, dict) and "state" in value and "param_groups" in value:
        groups = value.get("param_groups")
        first = groups[0] if isinstance(groups, (list, tuple)) and groups else {}
        settings = {
            _key(k): _scalar(v)
            for k, v in (first.items() if isinstance(first, dict) else [])
            if k != "params" and isinstance(v, scalars)
        }
        state = value["state"]
        n_params = len(state) if isinstance(state, (dict, list, tuple)) else 0
        return Entry(
            "optimizer",
            f"optimizer state for {n_params} params, {count} tensors, {human_bytes(size)}",
            size,
            settings,
        )
    if count:
        return Entry("tensors", f"{count} tensors, {human_bytes(size)}", size)
    if isinstance(value, scalars):
        return Entry("value", label(value), 0, _scalar(value))
    if isinstance(value, dict):
        plain = {_key(k): _scalar(v) for k, v in value.items() if isinstance(v, scalars)}
        shown = ", ".join(f"{k}={label(v)}" for k, v in list(plain.items())[:4])
        more = ", ..." if len(value) > 4 else ""
        summary = f"dict: {shown}{more}" if shown else f"dict, {len(value)} entries"
        return Entry("dict", summary, 0, plain)
    return Entry("other", type(value).__name__)


def _scalar(value: Any) -> Any:
    """A scalar as JSON and repr can carry it: an integer past 64 bits becomes its label."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return label(value)
    return value
