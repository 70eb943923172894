"""Checks of a checkpoint against its base (docs/findings.md): BASE_MISMATCH, VOCAB_MISMATCH,
MISSING_TENSORS, BASE_MODIFIED, BASE_ROUNDED, DTYPE_CHANGED. Pure functions of a
diffing.DiffReport."""

from __future__ import annotations

from ckpt_doctor import keys
from ckpt_doctor.diffing import DiffReport, TensorDiff
from ckpt_doctor.findings import Finding, finding, short_list


def _rows_only(t: TensorDiff) -> bool:
    shape, base = t.shape or (), t.base_shape or ()
    return len(shape) == len(base) >= 1 and shape[1:] == base[1:] and shape[0] != base[0]


def check_against_base(diff: DiffReport, *, n_base_keys: int) -> list[Finding]:
    """BASE_MISMATCH / VOCAB_MISMATCH / MISSING_TENSORS / BASE_MODIFIED / DTYPE_CHANGED."""
    out: list[Finding] = []
    shape_changed = diff.with_status("shape_changed")
    # A resized vocabulary changes rows only; another width means another model (BASE_MISMATCH).
    vocab = [t for t in shape_changed if t.name in keys.VOCAB_KEYS and _rows_only(t)]
    other = [t for t in shape_changed if t not in vocab]
    shared = [t for t in diff.tensors if t.status not in ("added", "removed")]
    if shared and len(other) * 2 > len(shared):
        eg = other[0]
        out.append(
            finding(
                "BASE_MISMATCH",
                f"{len(other)} of {len(shared)} shared tensors differ in shape "
                f"(e.g. {eg.name} {list(eg.shape or ())} vs base {list(eg.base_shape or ())}): "
                "this base is not the model the checkpoint was trained from",
                "pass the base weights the fine-tune started from (same size and version)",
                tensors=[t.name for t in other],
            )
        )
    for t in vocab:
        rows, base_rows = (t.shape or (0,))[0], (t.base_shape or (0,))[0]
        out.append(
            finding(
                "VOCAB_MISMATCH",
                f"{t.name} has {rows} rows, the base has {base_rows}: the vocabulary was "
                f"resized by {rows - base_rows:+d} tokens",
                "use the fine-tuned embedding/output tensors and the tokenizer with the added "
                "tokens; the base tokenizer cannot produce the new ids",
                tensor=t.name,
                rows=rows,
                base_rows=base_rows,
            )
        )
    removed = [t.name for t in diff.with_status("removed")]
    present_base = n_base_keys - len(removed)
    if removed and present_base * 2 >= n_base_keys:
        out.append(
            finding(
                "MISSING_TENSORS",
                f"{len(removed)} base tensor(s) are absent from this full checkpoint: "
                f"{short_list(removed)}",
                "the save dropped them (filtered state dict?); load them from the base or re-save",
                tensors=removed,
            )
        )
    drifted = [t for t in diff.with_status("modified") if not t.is_adapter]
    if drifted:
        detail = ", ".join(
            f"{t.name} (max |Δ| {t.max_abs:.3g}, rel L2 {t.rel_l2:.2e})" for t in drifted[:5]
        )
        out.append(
            finding(
                "BASE_MODIFIED",
                f"{len(drifted)} frozen base tensor(s) differ from the base: {detail}"
                + (f" (+{len(drifted) - 5} more)" if len(drifted) > 5 else ""),
                "the adapter alone will not reproduce this model: keep these tensors with the "
                "adapter, or restore them from the base if the drift is unwanted",
                tensors=[t.name for t in drifted],
            )
        )
    # Saved in a narrower dtype: the values are the base's rounded (equal once cast) but not
    # the base's. A model saved in bf16 runs a rounded base, which an adapter alone does not.
    rounded = [
        t for t in diff.with_status("dtype_changed") if not t.is_adapter and (t.n_diff or 0) > 0
    ]
    if rounded:
        worst = max(rounded, key=lambda t: t.max_abs or 0.0)
        pairs = sorted({f"{t.base_dtype}->{t.dtype}" for t in rounded})
        out.append(
            finding(
                "BASE_ROUNDED",
                f"{len(rounded)} frozen base tensor(s) were saved as {', '.join(pairs)}, which "
                f"rounds their values (largest change: {worst.name}, max |Δ| "
                f"{worst.max_abs or 0:.3g}, rel L2 {worst.rel_l2 or 0:.2e}): "
                f"{short_list([t.name for t in rounded])}",
                "the checkpoint runs a rounded copy of the base: base + adapter differs from it "
                "by that rounding alone; use the base in its own dtype, or round it the same way",
                tensors=[t.name for t in rounded],
                dtypes={t.name: t.dtype for t in rounded},
                max_abs=worst.max_abs,
            )
        )
    # Trained tensors may change dtype by design (v2 trains its norms in fp32).
    changed = [t for t in diff.recast if not t.is_adapter]
    if changed:
        pairs = sorted({f"{t.base_dtype}->{t.dtype}" for t in changed})
        out.append(
            finding(
                "DTYPE_CHANGED",
                f"{len(changed)} tensor(s) changed dtype from the base ({', '.join(pairs)}): "
                f"{short_list([t.name for t in changed])}",
                "a dtype change alone keeps the values (up to rounding); any that also changed "
                "value are listed under BASE_MODIFIED; cast back if the bytes matter",
                tensors=[t.name for t in changed],
            )
        )
    return out
