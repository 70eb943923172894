"""The findings catalogue (docs/findings.md): stable ids, their severities, and the record type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ckpt_doctor.errors import CkptDoctorError

Severity = Literal["error", "warning", "info"]

# One definition of every finding id and its default severity.
CATALOGUE: dict[str, Severity] = {
    "UNREADABLE": "error",
    "UNSAFE_PICKLE": "error",
    "EMPTY": "error",
    "CONTAINER_NESTED": "info",
    # An error wherever it is found: predicted from the key names (inspect, diagnose, verify)
    # or seen in a load (smoke-generate --load-as upstream), the model runs as the plain base.
    "LOAD_NOTHING": "error",
    # The family's own loader raises on the file (a flat file where it indexes ['model'], a
    # name it refuses): upstream cannot load it at all.
    "LOAD_FAILS": "error",
    "KEY_PREFIX": "warning",
    "NONFINITE": "error",
    "FP16_OVERFLOW": "warning",
    "ADAPTER_MISSING": "error",
    "ADAPTER_INERT": "error",
    "ADAPTER_SHAPE": "error",
    "ADAPTER_CONFIG": "warning",
    # Tensors that neither a base model nor any known adapter family explains.
    "ADAPTER_UNKNOWN": "warning",
    "GATE_SHAPE": "error",
    "GATE_TANH_MISMATCH": "warning",
    "BASE_MISMATCH": "error",
    "BASE_MODIFIED": "warning",
    "MISSING_TENSORS": "error",
    "VOCAB_MISMATCH": "error",
    "DTYPE_CHANGED": "info",
    # Base tensors saved in a narrower dtype whose rounding changed their values.
    "BASE_ROUNDED": "warning",
    "OPTIMIZER_STATE": "info",
    "UNEXPECTED_KEYS": "warning",
    # verify's own failures: the evidence of a failed check.
    "SHA256_MISMATCH": "error",  # tensors differ from the sha256 in the file's metadata
    "NOT_BIT_EXACT": "error",  # adapter tensors differ from (or are absent in) --full's
    "LOGITS_DIFFER": "error",  # base + adapter does not reproduce --full's logits
    "NO_EOS": "error",
    "LOOP": "error",
    # diagnose's own: a smoke arm that should run raised an error with no catalogue id.
    "SMOKE_FAILED": "error",
}

SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


@dataclass(frozen=True)
class Finding:
    id: str
    message: str
    hint: str
    severity: Severity = "info"
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
            "evidence": self.evidence,
        }


def short_list(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, and how many more: what a finding message shows."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def finding(
    id: str, message: str, hint: str, *, severity: Severity | None = None, **evidence: Any
) -> Finding:
    """Build a finding with the catalogue severity unless the caller escalates it."""
    if id not in CATALOGUE:
        raise KeyError(f"unknown finding id {id!r}")
    return Finding(id, message, hint, severity or CATALOGUE[id], evidence)


def error_finding(exc: CkptDoctorError, **evidence: Any) -> Finding:
    """A raised error recorded as an error finding: its code is the id (a catalogue id for
    every refusal about the files; USAGE / INTERNAL stay as they are)."""
    return Finding(exc.code, exc.message, exc.hint, "error", evidence)


def exit_code_for(findings: list[Finding]) -> int:
    """The exit-code rule: 1 when any warning or error finding is present, else 0."""
    return 1 if any(f.severity in ("warning", "error") for f in findings) else 0
