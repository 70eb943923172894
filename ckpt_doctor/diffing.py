"""Diff a checkpoint against base weights: every tensor classified, adapter tensors called out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpt_doctor import keys
from ckpt_doctor.handles import TensorHandle

if TYPE_CHECKING:
    from ckpt_doctor.families import Family
from ckpt_doctor.numerics import compare

STATUSES = ("added", "removed", "modified", "identical", "shape_changed", "dtype_changed")

# progress(done_bytes, total_bytes, current_name)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str
    max_abs: float | None = None
    rel_l2: float | None = None
    n_diff: int | None = None
    shape: tuple[int, ...] | None = None
    base_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    base_dtype: str | None = None
    is_adapter: bool = False

    @property
    def layer(self) -> int | None:
        return keys.layer_index(self.name)

    @property
    def recast(self) -> bool:
        return None not in (self.dtype, self.base_dtype) and self.dtype != self.base_dtype

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            # NaN / Inf stay floats here; render.print_json writes them as null.
            "max_abs": self.max_abs,
            "rel_l2": self.rel_l2,
            "n_diff": self.n_diff,
            "shape": list(self.shape) if self.shape is not None else None,
            "base_shape": list(self.base_shape) if self.base_shape is not None else None,
            "dtype": self.dtype,
            "base_dtype": self.base_dtype,
            "is_adapter": self.is_adapter,
        }


@dataclass(frozen=True)
class LayerSummary:
    layer: int | None  # None: global tensors (embeddings, final norm, output) and extras
    counts: dict[str, int]


@dataclass(frozen=True)
class DiffReport:
    tensors: list[TensorDiff]
    compared_bytes: int
    notes: list[str] = field(default_factory=list)
    family: str | None = None  # the adapter family whose tensors are called out

    def with_status(self, *statuses: str) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status in statuses]

    @property
    def recast(self) -> list[TensorDiff]:
        """Tensors on both sides whose dtype differs, values changed ("modified") or not."""
        return [t for t in self.tensors if t.recast]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(t.status for t in self.tensors)
        return {s: c.get(s, 0) for s in STATUSES}

    @property
    def exit_code(self) -> int:
        """0 when every tensor is identical to the base, else 1 (a difference to look at)."""
        return 0 if self.counts["identical"] == len(self.tensors) else 1

    @property
    def adapter(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.is_adapter]

    def per_layer(self) -> list[LayerSummary]:
        by_layer: dict[int | None, Counter] = {}
        for t in self.tensors:
            by_layer.setdefault(t.layer, Counter())[t.status] += 1
        order = sorted((k for k in by_layer if k is not None), key=int)
        rows = [LayerSummary(k, dict(by_layer[k])) for k in order]
        if None in by_layer:
            rows.append(LayerSummary(None, dict(by_layer[None])))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": [t.to_json() for t in self.tensors],
            "counts": self.counts,
            "per_layer": [{"layer": r.layer, "counts": r.counts} for r in self.per_layer()],
            "adapter": [t.name for t in self.adapter],
            "family": self.family,
            "compared_bytes": self.compared_bytes,
            "notes": self.notes,
        }


def diff_tensors(
    tensors: Mapping[str, TensorHandle],
    base: Mapping[str, TensorHandle],
    *,
    family: Family | None = None,
    progress: Progress | None = None,
) -> DiffReport:
    """Classify every name in either mapping; values compared in bounded chunks. ``family``
    (the checkpoint's adapter family) says which tensors are the adapter."""
    names = list(tensors) + [n for n in base if n not in tensors]
    shared = [n for n in names if n in tensors and n in base]
    total = sum(base[n].nbytes + tensors[n].nbytes for n in shared)
    done = 0
    out: list[TensorDiff] = []
    for name in names:
        a, b = tensors.get(name), base.get(name)
        common = {
            "shape": tuple(a.shape) if a else None,
            "base_shape": tuple(b.shape) if b else None,
            "dtype": _dtype_name(a) if a else None,
            "base_dtype": _dtype_name(b) if b else None,
            "is_adapter": family is not None and family.is_trained(name),
        }
        if b is None:
            out.append(TensorDiff(name, "added", **common))
            continue
        if a is None:
            out.append(TensorDiff(name, "removed", **common))
            continue
        if a.shape != b.shape:
            out.append(TensorDiff(name, "shape_changed", **common))
        elif a.dtype != b.dtype and "complex" in a.dtype.name + b.dtype.name:
            # Values are compared as real float64: a complex side has no such view.
            out.append(TensorDiff(name, "dtype_changed", **common))
        else:
            if progress:
                progress(done, total, name)
            c = compare(a, b)
            if a.dtype != b.dtype:
                # A new dtype is a change of values only when the values really differ.
                status = "dtype_changed" if c.equal_when_cast else "modified"
            else:
                status = "identical" if c.identical else "modified"
            out.append(TensorDiff(name, status, c.max_abs, c.rel_l2, c.n_diff, **common))
        done += a.nbytes + b.nbytes
    if progress:
        progress(total, total, "")
    return DiffReport(out, total, family=family.name if family is not None else None)


def _dtype_name(h: TensorHandle) -> str:
    return h.dtype.name
