"""``inspect``: what a checkpoint is, what is inside, and what is wrong with it."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_doctor import adapter_checks, checks, keys
from ckpt_doctor.adapters import AdapterConfig, checkpoint_adapter, checkpoint_family
from ckpt_doctor.base_checks import check_against_base
from ckpt_doctor.containers import subscripts
from ckpt_doctor.diffing import DiffReport, Progress, diff_tensors
from ckpt_doctor.facts import ModelFacts, model_facts
from ckpt_doctor.families import Family
from ckpt_doctor.findings import SEVERITY_RANK, Finding, exit_code_for
from ckpt_doctor.load_checks import load_findings
from ckpt_doctor.numerics import ValueScan, scan_values
from ckpt_doctor.reader import Checkpoint, Entry
from ckpt_doctor.transforms import raw_matches_training

# Files up to this size get every tensor's values scanned; larger ones only the adapter's
# (what training changed) unless --deep, so inspect stays a seconds-long, metadata-only read.
FULL_SCAN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DtypeRow:
    dtype: str
    tensors: int
    parameters: int
    bytes: int


@dataclass(frozen=True)
class GateRow:
    """One adapted layer: j indexes its prompt rows in adapter_query.weight."""

    layer: int
    prompt_index: int | None
    shape: tuple[int, ...]
    g: list[float]
    tanh_g: list[float]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "prompt_index": self.prompt_index,
            "shape": list(self.shape),
            "g": self.g,
            "tanh_g": self.tanh_g,
        }


@dataclass(frozen=True)
class TensorRow:
    """One tensor as the file stores it (inspect --tensors)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class InspectReport:
    path: Path
    format: str
    container_path: tuple[str, ...]
    files: list[Path]
    tensors: int
    parameters: int
    total_bytes: int
    dtypes: list[DtypeRow]
    facts: ModelFacts
    adapter: AdapterConfig | None
    adapter_bytes: int
    adapted_layers: list[int]
    gates: list[GateRow]
    entries: dict[str, Entry]
    args: dict[str, Any] | None
    prefix: str | None  # wrapper segments / another family's prefix on the names ("module.")
    findings: list[Finding]
    scanned_tensors: int
    scanned_bytes: int
    base_path: Path | None = None
    diff: DiffReport | None = None
    notes: list[str] = field(default_factory=list)
    tensor_list: list[TensorRow] | None = None  # inspect --tensors [GLOB]; None: not asked

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.findings)

    @property
    def container_subscripts(self) -> str:
        return subscripts(self.container_path)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "container_path": list(self.container_path),
            "files": [str(f) for f in self.files],
            "tensors": self.tensors,
            "parameters": self.parameters,
            "bytes": self.total_bytes,
            "dtypes": [vars(r) for r in self.dtypes],
            "model": self.facts.to_json(),
            "adapter": None
            if self.adapter is None
            else {
                **self.adapter.to_json(),
                "bytes": self.adapter_bytes,
                "adapted_layers": self.adapted_layers,
            },
            "gates": [r.to_json() for r in self.gates],
            "entries": {
                k: {"kind": e.kind, "summary": e.summary, "bytes": e.tensor_bytes}
                for k, e in self.entries.items()
            },
            "args": _jsonable(self.args),
            "prefix": self.prefix,
            "scanned": {"tensors": self.scanned_tensors, "bytes": self.scanned_bytes},
            "base": str(self.base_path) if self.base_path else None,
            "diff_counts": self.diff.counts if self.diff else None,
            "notes": self.notes,
            "tensor_list": None
            if self.tensor_list is None
            else [t.to_json() for t in self.tensor_list],
            "findings": [f.to_json() for f in self.findings],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def inspect_checkpoint(
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    deep: bool = False,
    progress: Progress | None = None,
    tensors_glob: str | None = None,
) -> InspectReport:
    """Summarise a checkpoint and run every check that needs no generation; with
    ``tensors_glob`` also list the tensors whose names match it (``*`` for all)."""
    tensors = ckpt.borrow_params(base).canonical()
    own_facts = model_facts(tensors, params=ckpt.params)
    base_tensors = base.canonical() if base is not None else None
    facts = (
        model_facts(base_tensors, params=base.params, fallback=own_facts)
        if base is not None and base_tensors is not None
        else own_facts
    )
    family = checkpoint_family(ckpt)
    adapter = checkpoint_adapter(ckpt, family=family)
    adapted = adapter.adapted_layers(facts.n_layers) if adapter else []
    gate_values = {
        i: tensors[k].values() for i, k in (adapter.gate_layers if adapter else {}).items()
    }

    def scanned(name: str) -> bool:
        small = deep or ckpt.total_bytes <= FULL_SCAN_BYTES
        return small or (family is not None and family.is_trained(name))

    to_scan = [n for n, h in tensors.items() if h.is_float and scanned(n)]
    # The static checks read values in the saved row order (HF's rotary order of q/k does not
    # change a NaN count or an all-zero B, and needs no head count from a config.json).
    as_saved = {keys.canonical_name(n): h for n, h in ckpt.tensors.items()}
    scans: dict[str, ValueScan] = {n: scan_values(as_saved[n]) for n in to_scan}

    findings: list[Finding] = []
    findings += checks.check_empty(ckpt)
    findings += load_findings(ckpt, family=family, facts=facts, adapter=adapter)
    findings += checks.check_values(scans)
    findings += adapter_checks.check_adapter(
        as_saved, adapter, facts, expected=adapter_checks.adapter_expected(ckpt.args)
    )
    # Baked gates (repair --bake-tanh) hold tanh(g): raw inference is what training did.
    findings += adapter_checks.check_gates(
        gate_values, facts, adapted, family=family, tanh_baked=raw_matches_training(ckpt.metadata)
    )
    findings += checks.check_optimizer(ckpt)
    diff = None
    if base is not None and base_tensors is not None:
        diff = diff_tensors(tensors, base_tensors, family=family, progress=progress)
        n_base = sum(1 for n in base_tensors if keys.is_base_key(n)) or len(base_tensors)
        findings += check_against_base(diff, n_base_keys=n_base)

    adapter_names = adapter.keys if adapter else ()
    return InspectReport(
        path=ckpt.path,
        format=ckpt.format,
        container_path=ckpt.container_path,
        files=ckpt.files,
        tensors=len(ckpt.tensors),
        parameters=sum(h.numel for h in ckpt.tensors.values()),
        total_bytes=ckpt.total_bytes,
        dtypes=_dtype_rows(ckpt),
        facts=facts,
        adapter=adapter,
        adapter_bytes=sum(tensors[n].nbytes for n in adapter_names),
        adapted_layers=adapted,
        gates=_gate_rows(gate_values, adapted),
        entries=ckpt.entries,
        args=ckpt.args,
        prefix=_foreign_prefix(ckpt, family),
        findings=sorted(findings, key=lambda f: -SEVERITY_RANK[f.severity]),
        scanned_tensors=len(scans),
        scanned_bytes=sum(tensors[n].nbytes for n in scans),
        base_path=base.path if base is not None else None,
        diff=diff,
        notes=list(ckpt.notes),
        tensor_list=None if tensors_glob is None else tensor_rows(ckpt, tensors_glob),
    )


def _foreign_prefix(ckpt: Checkpoint, family: Family | None) -> str | None:
    rewrite = ckpt.prefix
    own = family.loader.own_prefix if family is not None else ""
    return " + ".join(rewrite.foreign(own)) or None if rewrite is not None else None


def tensor_rows(ckpt: Checkpoint, pattern: str = "*") -> list[TensorRow]:
    """The file's tensors (names as stored, in file order) whose name matches the glob."""
    return [
        TensorRow(name, h.shape, h.dtype.name, h.nbytes)
        for name, h in ckpt.tensors.items()
        if fnmatch.fnmatchcase(name, pattern)
    ]


def _dtype_rows(ckpt: Checkpoint) -> list[DtypeRow]:
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for h in ckpt.tensors.values():
        row = acc[h.dtype.name]
        row[0] += 1
        row[1] += h.numel
        row[2] += h.nbytes
    return [DtypeRow(d, *v) for d, v in sorted(acc.items(), key=lambda kv: -kv[1][2])]


def _gate_rows(gate_values: dict[int, np.ndarray], adapted: list[int]) -> list[GateRow]:
    layers = adapted or sorted(i for i, g in gate_values.items() if g.any())
    rows = []
    for j, i in enumerate(layers):
        g = gate_values.get(i)
        if g is None:
            continue
        values = g.reshape(-1)
        rows.append(
            GateRow(
                i,
                j if adapted else None,
                tuple(g.shape),
                values.tolist(),
                np.tanh(values).tolist(),
            )
        )
    return rows
