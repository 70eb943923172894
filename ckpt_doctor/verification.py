"""``verify``: prove an extracted adapter is exact, complete and loadable.

1. reload: every tensor reads back; a safetensors sha256 in the metadata matches the tensors;
2. upstream load: the file as saved loads the way upstream example.py loads it
   (``load_state_dict(torch.load(path), strict=False)`` on the top-level keys): no container,
   no prefix, so its adapter tensors are really taken (CONTAINER_NESTED/LOAD_NOTHING/KEY_PREFIX);
3. values: the checks inspect runs on values and gates (NONFINITE, ADAPTER_INERT, GATE_SHAPE..);
4. bit-exact: with --full, each adapter tensor equals the source checkpoint's, bit for bit;
5. complete: with --full, every tensor the family trains was extracted; drifted frozen tensors
   are reported as BASE_MODIFIED, frozen tensors rounded to a narrower dtype as BASE_ROUNDED;
6. strict load: a strict load of base + adapter into the reference model has no error finding;
7. same model: with --full, logits of base + adapter equal the full checkpoint's on a few
   prompts (identical when the base did not drift; a rounded base is rounded the same way first).
Every failed check comes with a finding that says why. Each family is checked by its own rules
(its loader, its trained tensors); the checks the reference model cannot run for a family
(LLaMA-Adapter v2 multimodal, litgpt) are listed as not run, with the reason. Without --full,
bit-exact, complete and same logits cannot run: they are listed as not run too, and the verdict
is "partially verified" (exit 0 when every check that ran passed: no finding says anything is
wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor.adapters import AdapterConfig, checkpoint_adapter, checkpoint_family, lora_config
from ckpt_doctor.base_checks import check_against_base
from ckpt_doctor.checks import check_empty, content_findings
from ckpt_doctor.diffing import DiffReport, diff_tensors
from ckpt_doctor.errors import ModelLoadError
from ckpt_doctor.facts import ModelFacts, model_facts
from ckpt_doctor.families import LLAMA_ADAPTER_V1, PEFT_LORA, UNKNOWN, Family, require_runs_here
from ckpt_doctor.findings import Finding, error_finding, exit_code_for, finding
from ckpt_doctor.handles import TensorHandle
from ckpt_doctor.inspection import FULL_SCAN_BYTES
from ckpt_doctor.load_checks import applies, load_findings
from ckpt_doctor.numerics import compare
from ckpt_doctor.progress import Progress, as_bytes, prefixed
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.transforms import Transforms, raw_matches_training
from ckpt_doctor.upstream_load import own_load


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    ran: bool = True  # False: could not run (detail says why); neither a pass nor a failure

    @property
    def status(self) -> str:
        return "not run" if not self.ran else "pass" if self.passed else "fail"

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "status": self.status}


NEEDS_FULL = "not run: needs --full, the checkpoint it was extracted from"


def not_run(name: str, why: str = NEEDS_FULL) -> Check:
    return Check(name, False, why, ran=False)


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    max_logit_diff: float | None = None
    family: str | None = None

    @property
    def passed(self) -> bool:
        """Every check that ran passed (see ``verdict`` for the ones that could not run)."""
        return all(c.passed for c in self.checks if c.ran)

    @property
    def not_run(self) -> list[str]:
        return [c.name for c in self.checks if not c.ran]

    @property
    def verdict(self) -> str:
        if not self.passed:
            return "verification failed"
        skipped = [c for c in self.checks if not c.ran]
        if not skipped:
            return "verified"
        n = len(skipped)
        if all(c.detail == NEEDS_FULL for c in skipped):
            return f"partially verified: {n} check{'s' * (n != 1)} need{'s' * (n == 1)} --full"
        return f"partially verified: {n} check{'s' * (n != 1)} could not run (see each)"

    @property
    def exit_code(self) -> int:
        # A failed check always comes with its finding; a failed check alone still fails.
        return max(exit_code_for(self.findings), 0 if self.passed else 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "family": self.family,
            "verdict": self.verdict,
            "not_run": self.not_run,
            "checks": [c.to_json() for c in self.checks],
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
    """The checks above; ``progress`` hears the comparison with the base and the model loads."""
    family = checkpoint_family(adapter.borrow_params(base))
    if full is not None:
        full.borrow_params(base)
        if family is PEFT_LORA and lora_config(full)[0] is None:
            full.adapter_json = lora_config(adapter)[0]  # a bare state dict: the adapter's alpha
    if family is UNKNOWN:
        require_runs_here(family, adapter.path, command="verify")
    report = VerifyReport(family=family.name if family is not None else None)
    tensors = adapter.canonical()
    facts = model_facts(
        base.canonical(),
        params=base.params,
        fallback=model_facts(tensors, params=adapter.params),
    )
    config = checkpoint_adapter(adapter, family=family)
    report.checks.append(_reload(adapter, report))
    report.checks.append(_upstream_load(adapter, family, facts, config, report))
    report.checks.append(_values(adapter, tensors, facts, config, report))
    transforms = Transforms.from_metadata(adapter.metadata)  # what verify redoes on --full
    rounded: dict[str, str] = {}
    if full is not None:
        source = full.canonical()
        report.checks.append(_bit_exact(tensors, source, report, transforms))
        compared = as_bytes(progress, "complete: comparing --full with the base")
        diff = diff_tensors(source, base.canonical(), family=family, progress=compared)
        about_base = check_against_base(diff, n_base_keys=len(base.tensors))
        _add(report, [f for f in about_base if f.id in ("BASE_MODIFIED", "BASE_ROUNDED")])
        rounded = next((f.evidence["dtypes"] for f in about_base if f.id == "BASE_ROUNDED"), {})
        report.checks.append(_complete(tensors, diff, family, full, report))
    else:
        report.checks += [not_run("bit-exact"), not_run("complete")]
    if family is not None and not family.runs_here:
        why = f"not run: the reference model does not run {family.name} ({family.refusal})"
        report.checks.append(not_run("strict load", why))
        report.checks.append(not_run("same logits", why if full is not None else NEEDS_FULL))
        return report
    loads = prefixed(progress, "strict load: ")
    check, model = _loads(adapter, base, report, rounded, loads)
    report.checks.append(check)
    if full is None:
        report.checks.append(not_run("same logits"))
    elif model is None:
        report.checks.append(Check("same logits", False, "not run: the strict load failed"))
    else:
        logits = prefixed(progress, "same logits: ")
        report.checks.append(
            _same_logits(model, base, full, report, transforms, set(tensors), rounded, logits)
        )
    return report


def _add(report: VerifyReport, findings: list[Finding]) -> None:
    """Add findings whose id is not reported yet: the static checks and the strict load can
    both see, say, a scalar gate; one finding per fact."""
    seen = {f.id for f in report.findings}
    report.findings += [f for f in findings if f.id not in seen]


def _reload(adapter: Checkpoint, report: VerifyReport) -> Check:
    from ckpt_doctor.extraction import tensor_digest

    loaded = {n: h.to_torch() for n, h in adapter.tensors.items()}
    recorded = (adapter.metadata or {}).get("sha256")
    if recorded is None:
        if not loaded:
            _add(report, check_empty(adapter))
        return Check("reload", bool(loaded), f"{len(loaded)} tensors read back")
    actual = tensor_digest(loaded)
    if actual == recorded:
        return Check("reload", True, "sha256 matches the metadata")
    _add(
        report,
        [
            finding(
                "SHA256_MISMATCH",
                f"the tensors of {adapter.path} hash to sha256 {actual[:16]}..., its metadata "
                f"records {recorded[:16]}...: the tensors changed after the file was written",
                "re-extract the adapter from its source checkpoint; do not edit it in place",
                recorded=recorded,
                actual=actual,
            )
        ],
    )
    return Check("reload", False, "sha256 MISMATCH")


def _upstream_load(
    adapter: Checkpoint,
    family: Family | None,
    facts: ModelFacts,
    config: AdapterConfig | None,
    report: VerifyReport,
) -> Check:
    """How the family's own code loads the file as saved, not as ckpt-doctor resolves it."""
    found = load_findings(adapter, family=family, facts=facts, adapter=config)
    _add(report, found)
    if not applies(adapter, family) and family is not None:
        why = f"not checked: ckpt-doctor does not model {family.name}'s own model names"
        return not_run("upstream load", why)
    load = own_load(adapter, family=family, facts=facts, adapter=config)
    if load.error is not None:
        return Check("upstream load", False, f"{load.code} raises: {load.error} (LOAD_FAILS)")
    who = "" if family in (None, LLAMA_ADAPTER_V1) else f"{family.name}'s loader: "
    detail = (
        f"{who}load_state_dict(strict=False) on the file as saved takes {len(load.matched)} of "
        f"its {len(load.seen)} top-level keys"
    )
    bad = [f.id for f in found if f.severity != "info"]
    # strict=False still raises on a size mismatch: a legacy scalar gate crashes upstream
    # (the GATE_SHAPE finding comes from the value checks and the strict load).
    heads = facts.n_heads
    gate = family.gate if family is not None else None
    if gate is not None and gate.shape == "heads" and heads and config is not None:
        shapes = {n: adapter.tensors[n].shape for n in load.matched}
        wrong = [
            n
            for n in load.matched
            if keys_layer_gate(n, family) and tuple(shapes[n]) != (1, heads, 1, 1)
        ]
        if wrong:
            detail += f", but raises on the shape of {len(wrong)} gate(s)"
            bad.append("GATE_SHAPE")
    # An empty file loads nothing either (EMPTY says so).
    passed = bool(load.matched) and not bad
    return Check("upstream load", passed, detail + (f" ({', '.join(bad)})" if bad else ""))


def keys_layer_gate(saved: str, family: Family) -> bool:
    """Whether a saved name is one of the family's per-layer gates."""
    from ckpt_doctor import keys

    return bool(family.gate_layers([keys.canonical_name(saved)]))


def _values(
    adapter: Checkpoint,
    tensors: dict,
    facts: ModelFacts,
    config: AdapterConfig | None,
    report: VerifyReport,
) -> Check:
    found = content_findings(
        tensors,
        facts,
        config,
        scan_all=adapter.total_bytes <= FULL_SCAN_BYTES,
        tanh_baked=raw_matches_training(adapter.metadata),
    )
    _add(report, found)
    errors = sorted({f.id for f in found if f.severity == "error"})
    warnings = sorted({f.id for f in found if f.severity == "warning"})
    if errors:
        return Check("values", False, ", ".join(errors + warnings))
    detail = "values finite"
    if config is not None and config.gate_layers:
        detail += "; gates fit the model and are not all zero"
    return Check("values", True, detail + (f" (warnings: {', '.join(warnings)})" * bool(warnings)))


def _bit_exact(tensors: dict, source: dict, report: VerifyReport, transforms: Transforms) -> Check:
    """Each adapter tensor equals the source's, bit for bit, after the transforms the file's
    metadata records (extract --dtype, repair's gate broadcast and tanh bake)."""
    missing = [n for n in tensors if n not in source]
    differ = [n for n, h in tensors.items() if n in source and not _same(h, source[n], transforms)]
    if not missing and not differ:
        detail = f"{len(tensors)} tensors identical to the source"
        if transforms:
            detail += f" as transformed ({_described(transforms)})"
        return Check("bit-exact", True, detail)
    # Only the parts that have something in them.
    parts = [
        f"{label}: {', '.join(names[:5])}" + (f" (+{len(names) - 5} more)" * (len(names) > 5))
        for label, names in (("differ", differ), ("absent from source", missing))
        if names
    ]
    detail = "; ".join(parts)
    _add(
        report,
        [
            finding(
                "NOT_BIT_EXACT",
                f"{len(differ) + len(missing)} of the adapter's {len(tensors)} tensors are not "
                f"the source checkpoint's, bit for bit ({detail})",
                "re-extract the adapter from this checkpoint (ckpt-doctor extract), or pass the "
                "--full checkpoint it was really extracted from",
                differ=differ,
                absent=missing,
            )
        ],
    )
    return Check("bit-exact", False, detail)


def _same(h: TensorHandle, src: TensorHandle, transforms: Transforms) -> bool:
    if not transforms:
        return h.shape == src.shape and compare(h, src).identical
    import torch

    expected = transforms.apply(h.name, src.to_torch(), shape=h.shape)
    got = h.to_torch()
    return got.dtype == expected.dtype and torch.equal(got, expected)


def _described(transforms: Transforms) -> str:
    parts = [f"cast to {transforms.cast}"] if transforms.cast else []
    parts += ["scalar gates broadcast"] * transforms.broadcast
    parts += ["tanh baked into the gates"] * transforms.baked
    return ", ".join(parts)


def _complete(
    tensors: dict, diff: DiffReport, family: Family | None, full: Checkpoint, report: VerifyReport
) -> Check:
    """Every tensor the family trains is in the adapter (without a family: every tensor that
    differs from the base); frozen tensors that drifted are reported, not required."""
    drifted = {t.name for t in diff.with_status("modified") if not t.is_adapter}
    if family is not None:
        needed = [t.name for t in diff.tensors if t.is_adapter and t.status != "removed"]
    else:
        needed = [t.name for t in diff.tensors if t.status in ("added", "modified")]
        needed = [n for n in needed if n not in drifted]
    lost = [n for n in needed if n not in tensors]
    if not lost:
        trains = f"{family.name} trains" if family is not None else "differ from the base"
        detail = f"{len(needed)} tensors {trains}, all extracted"
        if drifted:
            detail += f"; {len(drifted)} drifted frozen tensors reported"
        return Check("complete", True, detail)
    names = ", ".join(lost[:5]) + (f" (+{len(lost) - 5} more)" * (len(lost) > 5))
    _add(
        report,
        [
            finding(
                "ADAPTER_MISSING",
                f"{len(lost)} tensor(s) that {full.path} trained are not in the adapter: {names}",
                "re-extract the adapter from this checkpoint (ckpt-doctor extract --base)",
                tensors=lost,
            )
        ],
    )
    return Check("complete", False, f"not extracted: {names}")


def _file_dtype(base: Checkpoint) -> str:
    """Verify in the weights' own dtype: parameters then share the file maps, so checking a
    multi-GB model costs no copy of it (a float32 upcast would double it)."""
    emb = base.canonical().get("tok_embeddings.weight")
    return emb.dtype.name if emb is not None and emb.is_float else "auto"


def _loads(
    adapter: Checkpoint,
    base: Checkpoint,
    report: VerifyReport,
    rounded: dict[str, str],
    progress: Progress | None,
) -> tuple[Check, Any]:
    """The strict load check and the model it built (None when the load raised). ``rounded``:
    base tensors the full checkpoint holds in a narrower dtype (BASE_ROUNDED), rounded alike so
    that the logits compare like for like."""
    from ckpt_doctor.loading import load_model

    try:
        model, load = load_model(
            base,
            adapter=adapter,
            load_as="strict",
            dtype=_file_dtype(base),
            max_seq_len=64,
            base_rounding=rounded,
            progress=progress,
        )
    except ModelLoadError as exc:  # a failed check with its reason, not an abort
        _add(report, [error_finding(exc, check="strict load")])
        return Check("strict load", False, f"[{exc.code}] {exc.message}"), None
    errors = [f for f in load.findings if f.severity == "error"]
    _add(report, load.findings)
    detail = f"{len(load.from_file)} of {load.model_keys} model keys from the adapter"
    if load.adapter is not None and load.adapter.lora is not None:
        detail = f"{len(load.from_file)} LoRA tensors merged into the base's linears"
    if rounded:
        detail += f"; {len(rounded)} base tensors rounded as the checkpoint's were"
    return Check("strict load", not errors, detail), model


def _same_logits(
    model: Any,
    base: Checkpoint,
    full: Checkpoint,
    report: VerifyReport,
    transforms: Transforms,
    adapter_names: set[str],
    rounded: dict[str, str],
    progress: Progress | None = None,
) -> Check:
    import torch

    from ckpt_doctor.generate import cpu_tuned
    from ckpt_doctor.loading import load_model
    from ckpt_doctor.overlay import prompt_rounding

    try:
        f, loaded = load_model(
            base,
            full=full,
            load_as="strict",
            dtype=_file_dtype(base),
            max_seq_len=64,
            progress=prefixed(progress, "--full: "),
        )
    except ModelLoadError as exc:  # --full does not fit the base: nothing to compare with
        _add(report, [error_finding(exc, check="same logits")])
        return Check("same logits", False, f"not run: --full does not load: {exc.message}")
    if transforms:  # the full model's adapter transformed as the file's was, from its source
        source = full.canonical()  # values (not the loaded copies: those are rounded already)
        with torch.no_grad():
            for name, param in f.named_parameters():
                if name in adapter_names and name in source:
                    src = source[name].to_torch()
                    param.copy_(transforms.apply(name, src, shape=tuple(param.shape)))
        # The adapter K/V again, from the new values, with the gate function both sides run.
        f.prepare(gate_fn=loaded.gate_fn, rounded=prompt_rounding(loaded.family))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.args.vocab_size, (3, 24), generator=g)  # no tokenizer needed
    # Same thread count and weight layout on both sides: bit-for-bit means the same GEMMs.
    with torch.inference_mode(), cpu_tuned(model, 3), cpu_tuned(f, 3):
        if progress is not None:
            progress("forward passes", 0, 2, "steps")
        la = model(prompts, 0, model.new_cache(3, 24), all_logits=True)
        if progress is not None:
            progress("forward passes", 1, 2, "steps")
        lf = f(prompts, 0, f.new_cache(3, 24), all_logits=True)
        if progress is not None:
            progress("forward passes", 2, 2, "steps")
    diff = float((la - lf).abs().max())
    report.max_logit_diff = diff
    drifted = any(x.id == "BASE_MODIFIED" for x in report.findings)
    if torch.equal(la, lf):
        detail = "base + adapter == full checkpoint, bit for bit"
        if rounded:
            detail += " (with the base rounded as the checkpoint's was: BASE_ROUNDED)"
        return Check("same logits", True, detail)
    detail = f"max |logit diff| {diff:.3g} vs the full checkpoint"
    if drifted:
        # A drifted base explains the difference (the finding names the tensors), but the
        # adapter alone still does not reproduce the fine-tuned model.
        return Check("same logits", False, detail + " (explained by BASE_MODIFIED)")
    _add(
        report,
        [
            finding(
                "LOGITS_DIFFER",
                f"base + adapter does not reproduce {full.path}: {detail} on 3 random prompts",
                "the adapter is not this checkpoint's (see NOT_BIT_EXACT / ADAPTER_MISSING), or "
                "the model needs tensors beyond the adapter: re-extract with --base",
                max_abs=diff,
            )
        ],
    )
    return Check("same logits", False, detail)
