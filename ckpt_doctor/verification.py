"""``verify``: prove an extracted adapter is exact, complete and loadable.

1. reload: every tensor reads back; a safetensors sha256 in the metadata matches the tensors;
2. bit-exact: with --full, each adapter tensor equals the source checkpoint's, bit for bit;
3. complete: with --full, every tensor that differs from the base was extracted, or is a
   drifted frozen tensor reported as BASE_MODIFIED;
4. loads: a strict load of base + adapter into the reference model has no error finding;
5. same model: with --full, logits of base + adapter equal the full checkpoint's on a few
   prompts (identical when the base did not drift).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor.checks import check_against_base
from ckpt_doctor.diffing import Progress, diff_tensors
from ckpt_doctor.findings import SEVERITY_RANK, Finding
from ckpt_doctor.numerics import compare
from ckpt_doctor.reader import Checkpoint


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    max_logit_diff: float | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        bad = any(SEVERITY_RANK[f.severity] >= 1 for f in self.findings)
        return 0 if self.passed and not bad else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [vars(c) for c in self.checks],
            "max_logit_diff": self.max_logit_diff,
            "findings": [f.to_json() for f in self.findings],
        }


def verify(
    adapter: Checkpoint,
    *,
    base: Checkpoint,
    full: Checkpoint | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    report = VerifyReport()
    tensors = adapter.canonical()
    report.checks.append(_reload(adapter))
    if full is not None:
        source = full.canonical()
        report.checks.append(_bit_exact(tensors, source))
        diff = diff_tensors(source, base.canonical(), progress=progress)
        report.findings += [
            f
            for f in check_against_base(diff, n_base_keys=len(base.tensors))
            if f.id == "BASE_MODIFIED"
        ]
        drifted = {t.name for t in diff.with_status("modified") if not t.is_adapter}
        needed = [t.name for t in diff.tensors if t.status in ("added", "modified")]
        lost = [n for n in needed if n not in tensors and n not in drifted]
        report.checks.append(
            Check(
                "complete",
                not lost,
                f"{len(needed) - len(drifted)} tensors differ from the base, all extracted"
                + (f"; {len(drifted)} drifted frozen tensors reported" if drifted else "")
                if not lost
                else f"not extracted: {', '.join(lost[:5])}",
            )
        )
    check, model = _loads(adapter, base, report)
    report.checks.append(check)
    if full is not None:
        report.checks.append(_same_logits(model, base, full, report))
    return report


def _reload(adapter: Checkpoint) -> Check:
    from ckpt_doctor.extraction import tensor_digest

    loaded = {n: h.to_torch() for n, h in adapter.tensors.items()}
    recorded = (adapter.metadata or {}).get("sha256")
    if recorded is None:
        return Check("reload", bool(loaded), f"{len(loaded)} tensors read back")
    ok = tensor_digest(loaded) == recorded
    return Check("reload", ok, "sha256 matches the metadata" if ok else "sha256 MISMATCH")


def _bit_exact(tensors: dict, source: dict) -> Check:
    missing = [n for n in tensors if n not in source]
    differ = [
        n
        for n, h in tensors.items()
        if n in source and (h.shape != source[n].shape or not compare(h, source[n]).identical)
    ]
    ok = not missing and not differ
    detail = f"{len(tensors)} tensors identical to the source"
    if not ok:
        detail = f"differ: {', '.join(differ[:5])}; absent from source: {', '.join(missing[:5])}"
    return Check("bit-exact", ok, detail)


def _file_dtype(base: Checkpoint) -> str:
    """Verify in the weights' own dtype: parameters then share the file maps, so checking a
    multi-GB model costs no copy of it (a float32 upcast would double it)."""
    emb = base.canonical().get("tok_embeddings.weight")
    return emb.dtype.name if emb is not None and emb.is_float else "auto"


def _loads(adapter: Checkpoint, base: Checkpoint, report: VerifyReport) -> tuple[Check, Any]:
    from ckpt_doctor.loading import load_model

    model, load = load_model(
        base, adapter=adapter, load_as="strict", dtype=_file_dtype(base), max_seq_len=64
    )
    errors = [f for f in load.findings if f.severity == "error"]
    report.findings += load.findings
    detail = f"{len(load.from_file)} of {load.model_keys} model keys from the adapter"
    return Check("strict load", not errors, detail), model


def _same_logits(model: Any, base: Checkpoint, full: Checkpoint, report: VerifyReport) -> Check:
    import torch

    from ckpt_doctor.generate import cpu_tuned
    from ckpt_doctor.loading import load_model

    f, _ = load_model(base, full=full, load_as="strict", dtype=_file_dtype(base), max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.args.vocab_size, (3, 24), generator=g)  # no tokenizer needed
    # Same thread count and weight layout on both sides: bit-for-bit means the same GEMMs.
    with torch.inference_mode(), cpu_tuned(model, 3), cpu_tuned(f, 3):
        la = model(prompts, 0, model.new_cache(3, 24), all_logits=True)
        lf = f(prompts, 0, f.new_cache(3, 24), all_logits=True)
    diff = float((la - lf).abs().max())
    report.max_logit_diff = diff
    drifted = any(x.id == "BASE_MODIFIED" for x in report.findings)
    if torch.equal(la, lf):
        return Check("same logits", True, "base + adapter == full checkpoint, bit for bit")
    detail = f"max |logit diff| {diff:.3g} vs the full checkpoint"
    # A drifted base explains the difference (the finding names the tensors), but the adapter
    # alone still does not reproduce the fine-tuned model.
    return Check("same logits", False, detail + (" (explained by BASE_MODIFIED)" * drifted))
