"""``diagnose``: static findings, an A/B smoke run, then the root cause and the fixing command.

Arms of the smoke run: A, the file as upstream example.py loads it (strict=False); B, only its
adapter tensors on the base (what extraction gives); C, the base alone. Their outcomes and
whether A's generations equal C's are the behavioural evidence for the verdict. A and B are
expected to end at eos; when they do not, their NONFINITE / LOOP / NO_EOS findings join the
diagnosis (C, the base, is not expected to stop). Each arm keeps its per-prompt results (text,
token ids, outcome, P(eos) per step) for the tables and reports. An arm that should work (A or
B) but raised becomes
a finding of its error's code; when every arm raised the same error (a tokenizer that cannot be
read, say), nothing was diagnosed and that error is raised as it is.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckpt_doctor import timings
from ckpt_doctor.adapters import checkpoint_family
from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.families import PEFT_LORA, peft, require_runs_here
from ckpt_doctor.findings import CATALOGUE, Finding, exit_code_for, finding
from ckpt_doctor.generate import GenerationConfig, Result
from ckpt_doctor.inspection import GateRow, inspect_checkpoint
from ckpt_doctor.progress import Progress, as_bytes, prefixed
from ckpt_doctor.reader import Checkpoint, open_checkpoint
from ckpt_doctor.smoke import resolve_tokenizer

# Root-cause precedence, most fundamental first, with the command that fixes each ({path},
# {base} filled in); None where no command can fix the file itself.
CAUSES: dict[str, str | None] = {
    "EMPTY": None,
    "UNREADABLE": None,
    "UNSAFE_PICKLE": None,
    "NONFINITE": None,
    "BASE_MISMATCH": None,
    "VOCAB_MISMATCH": None,
    "MISSING_TENSORS": None,
    # No adapter to extract or load: outranks how it would (not) load.
    "ADAPTER_MISSING": None,
    "KEY_PREFIX": "ckpt-doctor repair {path} -o fixed{ext}",
    # Its own loader raises (a flat file where it reads ['model']): extract writes its layout.
    "LOAD_FAILS": "ckpt-doctor extract {path} --base {base} -o adapter{ext}",
    "LOAD_NOTHING": "ckpt-doctor extract {path} --base {base} -o adapter{ext}",
    "GATE_SHAPE": "ckpt-doctor repair {path} --base {base} -o fixed{ext}",  # when repairable
    "ADAPTER_SHAPE": None,
    "ADAPTER_INERT": None,
    "BASE_MODIFIED": "ckpt-doctor repair {path} --base {base} --restore-base -o fixed{ext}",
    "BASE_ROUNDED": None,
    # safetensors: its metadata records the bake, so nothing bakes the gates twice.
    "GATE_TANH_MISMATCH": "ckpt-doctor repair {path} --bake-tanh -o fixed.safetensors",
    "FP16_OVERFLOW": None,
    "ADAPTER_CONFIG": None,
    # Symptoms of the smoke arms that should work, when no static finding explains them.
    "LOOP": None,
    "NO_EOS": None,
    "SMOKE_FAILED": None,
}
ARM_UPSTREAM, ARM_ADAPTER, ARM_BASE = (
    "as upstream loads it",
    "extracted adapter on the base",
    "base alone",
)


@dataclass
class Arm:
    name: str
    outcomes: dict[str, int] = field(default_factory=dict)
    generated: list[list[int]] = field(default_factory=list)
    matched: int | None = None
    model_keys: int | None = None
    error: str | None = None
    error_code: str | None = None  # the raised error's code; None when it ran or was not run
    error_hint: str | None = None
    findings: list[Finding] = field(default_factory=list)  # the arm's smoke findings
    results: list[Result] = field(default_factory=list)  # per prompt, as smoke-generate's
    gates: dict[int, list[float]] = field(default_factory=dict)  # the gate values it ran with
    timings: dict[str, float] = field(default_factory=dict)  # its own phases (timings.py)
    reused_base_run: bool = False  # nothing loaded: the base alone's generations, not rerun

    def to_json(self) -> dict[str, Any]:
        return {
            **vars(self),
            "findings": [f.to_json() for f in self.findings],
            "results": [r.to_json() for r in self.results],
            "gates": {str(layer): g for layer, g in self.gates.items()},
        }


@dataclass
class Diagnosis:
    path: Path
    root_cause: str | None
    verdict: str
    fix: str | None
    findings: list[Finding]
    arms: list[Arm] = field(default_factory=list)
    exit_code: int = 0
    gates: list[GateRow] = field(default_factory=list)  # the file's, as inspect reads them
    base_path: Path | None = None
    refused: CkptDoctorError | None = None  # the input could not be read: nothing diagnosed
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, all arms

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "base": None if self.base_path is None else str(self.base_path),
            "root_cause": self.root_cause,
            "verdict": self.verdict,
            "fix": self.fix,
            "arms": [a.to_json() for a in self.arms],
            "gates": [r.to_json() for r in self.gates],
            "findings": [f.to_json() for f in self.findings],
            "timings": self.timings,
        }


def _timed(fn: Callable[..., Diagnosis]) -> Callable[..., Diagnosis]:
    """The diagnosis with the seconds each phase took (all arms together) in ``timings``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Diagnosis:
        with timings.recording() as rec:
            result = fn(*args, **kwargs)
        result.timings = rec.to_json()
        return result

    return run


@_timed
def diagnose(
    path: Path,
    base_path: Path,
    *,
    tokenizer_path: Path | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 64,
    trust_pickle: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    config: GenerationConfig | None = None,
    gate_fn: str = "raw",
    attention: str = "auto",
    progress: Progress | None = None,
) -> Diagnosis:
    """Static findings, the three smoke arms, the root cause and its fix. ``config`` (template,
    sampling, CUDA graph; default greedy with ``max_new_tokens``), ``gate_fn`` and ``attention``
    are smoke-generate's generation options, the same for every arm."""
    config = config or GenerationConfig(max_new_tokens=max_new_tokens)
    try:
        with timings.phase("read"):
            ckpt = open_checkpoint(path, trust_pickle=trust_pickle)
    except CkptDoctorError as exc:
        found = finding(exc.code, exc.message, exc.hint) if exc.code in CAUSES else None
        return Diagnosis(
            path, exc.code, exc.message, None, [found] if found else [], [], 2, refused=exc
        )
    with timings.phase("read"):
        base = open_checkpoint(base_path, trust_pickle=trust_pickle)
    with ckpt, base:
        # Same rule as smoke-generate: no tokenizer, no A/B run, so say so up front.
        tokenizer_path = resolve_tokenizer(base, tokenizer_path)
        check = as_bytes(progress, "checking against the base")
        with timings.phase("checks"):
            report = inspect_checkpoint(ckpt, base=base, progress=check)
        family = checkpoint_family(ckpt)
        require_runs_here(family, path, command="diagnose")
        findings = list(report.findings)
        if report.adapter is None and not any(f.id == "ADAPTER_MISSING" for f in findings):
            findings.append(
                finding(
                    "ADAPTER_MISSING",
                    f"{path} holds no adapter tensors (adapter_query.weight, "
                    "layers.N.attention.gate): there is no adapter to load",
                    "diagnose the fine-tuned checkpoint or the extracted adapter, not the base",
                )
            )
        run = {
            "tokenizer_path": tokenizer_path, "prompts": prompts, "dtype": dtype,
            "device": device, "config": config, "gate_fn": gate_fn, "attention": attention,
        }  # fmt: skip
        has_adapter = report.adapter is not None and bool(report.adapter.keys)
        arms = _smoke_arms(ckpt, base, run, adapter=has_adapter, progress=progress)
    findings = _with_arm_evidence(findings, arms)
    ids = {f.id for f in findings if f.severity != "info"}
    cause = next((c for c in CAUSES if c in ids), None)
    cause_finding = next((f for f in findings if f.id == cause), None)
    ext = "" if family in (peft.ADAPTION_PROMPT, PEFT_LORA) else ".pth"  # a PEFT adapter: a dir
    fix = fix_command(cause_finding, path, base_path, ext=ext) if cause_finding else None
    verdict = _verdict(cause, findings, arms, ckpt)
    # A non-eos outcome of A or B exits 1 even without a finding (the exit-code contract).
    code = max(exit_code_for(findings), 0 if _healthy(arms) else 1)
    return Diagnosis(path, cause, verdict, fix, findings, arms, code, report.gates, base_path)


def fix_command(cause: Finding, path: Path, base: Path, *, ext: str = ".pth") -> str | None:
    """The command that fixes the root-cause finding, shell-quoted so that it runs as printed
    (paths with spaces or brackets); None where no command can fix the file itself, as for a
    gate shape that broadcasting cannot mend (evidence repairable=False)."""
    template = CAUSES.get(cause.id)
    weights = cause.evidence.get("weights_at") if cause.id == "EMPTY" else None
    if weights:  # an empty PEFT adapter: its run's checkpoint-N/ holds the weights
        found, base_arg = shlex.quote(weights[0]), shlex.quote(str(base))
        return f"ckpt-doctor extract {found} --base {base_arg} -o adapter"
    if template is None or cause.evidence.get("repairable") is False:
        return None
    return template.format(path=shlex.quote(str(path)), base=shlex.quote(str(base)), ext=ext)


def _healthy(arms: list[Arm]) -> bool:
    """Arms A and B both ran and every one of their prompts ended at eos."""
    return all(
        a.error is None and a.outcomes.get("eos", 0) > 0 and set(a.outcomes) == {"eos"}
        for a in arms[:2]
    )


def _comparable(a: Arm, b: Arm) -> bool:
    """Generations can be compared only when both arms ran ([] == [] proves nothing)."""
    return a.error is None and b.error is None


def _arm_error_finding(arm: Arm) -> Finding:
    # An error outside the catalogue (a usage error, say) still makes the diagnosis fail.
    code = arm.error_code or ""
    if code not in CATALOGUE:
        code = "SMOKE_FAILED"
    return finding(
        code,
        f"{arm.name}: the smoke run failed: {arm.error}",
        arm.error_hint or "run ckpt-doctor smoke-generate on this file for the details",
        severity="error",
        arm=arm.name,
        error=arm.error_code,
    )


def _with_arm_evidence(findings: list[Finding], arms: list[Arm]) -> list[Finding]:
    """Static findings plus what the arms showed: LOAD_NOTHING when arm A loaded nothing and
    the static checks did not predict it, the errors and the symptoms of the arms that should
    have worked."""
    upstream = arms[0]
    if upstream.error is None and upstream.matched == 0:
        loaded = next((f for f in upstream.findings if f.id == "LOAD_NOTHING"), None)
        if loaded is not None and not any(f.id == "LOAD_NOTHING" for f in findings):
            findings = [*findings, loaded]
    for arm in arms:
        if arm.name == ARM_BASE:
            continue  # the plain base is not expected to stop
        if arm.error_code is not None:
            failed = _arm_error_finding(arm)
            # A static finding of the same id (GATE_SHAPE, VOCAB_MISMATCH) already says why.
            if not any(f.id == failed.id for f in findings):
                findings = [*findings, failed]
        findings = findings + [
            replace(f, message=f"{arm.name}: {f.message}", evidence={**f.evidence, "arm": arm.name})
            for f in arm.findings
            if f.id in ("NONFINITE", "LOOP", "NO_EOS")
        ]
    return findings


def _adapter_only(ckpt: Checkpoint) -> Checkpoint:
    """What extraction keeps: the tensors the family trains, under their canonical names."""
    family = checkpoint_family(ckpt)
    tensors = {k: h for k, h in ckpt.canonical().items() if family and family.is_trained(k)}
    return Checkpoint(
        ckpt.path,
        ckpt.format,
        tensors,
        args=ckpt.args,
        metadata=ckpt.metadata,
        adapter_json=ckpt.adapter_json,
    )


def _smoke_arms(
    ckpt: Checkpoint,
    base: Checkpoint,
    run: dict[str, Any],
    *,
    adapter: bool,
    progress: Progress | None = None,
) -> list[Arm]:
    """The three arms, each a smoke_generate with ``run``'s settings (tokenizer, prompts,
    dtype, device, generation config, gate function, attention), on one load of the base:
    each arm puts its file's tensors in and takes them out again (loading.attach)."""
    from ckpt_doctor.smoke import load_smoke_base, smoke_generate

    plans: dict[str, dict[str, Any] | None] = {
        ARM_UPSTREAM: {"full": ckpt, "load_as": "upstream"},
        # Without adapter tensors arm B would be the base again: not run.
        ARM_ADAPTER: {"adapter": _adapter_only(ckpt)} if adapter else None,
        ARM_BASE: {},
    }
    # A base that cannot load (or a tokenizer that cannot be read) fails every arm alike:
    # nothing is diagnosed, and the error is raised as it is.
    shared = load_smoke_base(base, **run, progress=prefixed(progress, "base: "))
    arms = {name: Arm(name) for name in plans}
    raised: list[CkptDoctorError] = []
    base_results = None
    # The base alone first: an arm whose file puts nothing into the model (upstream's load
    # matching no key) takes its results instead of generating them again.
    for name in (ARM_BASE, ARM_UPSTREAM, ARM_ADAPTER):
        arm, kwargs, k = arms[name], plans[name], list(plans).index(name) + 1
        if kwargs is None:
            arm.error = "not run: the file holds no adapter tensors"
            continue
        shown = prefixed(progress, f"arm {k}/{len(plans)} ({name}): ")
        try:
            smoke = smoke_generate(
                base, **run, **kwargs, progress=shown, model=shared, base_results=base_results
            )
        except CkptDoctorError as exc:
            arm.error = f"[{exc.code}] {exc.message}"
            arm.error_code, arm.error_hint = exc.code, exc.hint
            raised.append(exc)
        else:
            for r in smoke.results:
                arm.outcomes[r.outcome] = arm.outcomes.get(r.outcome, 0) + 1
            arm.generated = [r.generated_ids for r in smoke.results]
            arm.results, arm.gates = smoke.results, smoke.gates
            arm.matched = len(smoke.load.from_file)
            arm.model_keys = smoke.load.model_keys
            arm.findings = smoke.findings
            arm.timings = smoke.timings
            arm.reused_base_run = smoke.reused_base_run
            if name == ARM_BASE:
                base_results = smoke.results
    attempted = sum(kwargs is not None for kwargs in plans.values())
    if len(raised) == attempted and len({(e.code, e.message) for e in raised}) == 1:
        # Nothing ran at all (an unreadable tokenizer, a broken base): not a diagnosis.
        raise raised[0]
    return list(arms.values())


def _verdict(cause: str | None, findings: list[Finding], arms: list[Arm], ckpt: Checkpoint) -> str:
    upstream, _, alone = arms
    if cause is None and not _healthy(arms):
        # Not reachable while every failed arm carries a finding; never a clean bill regardless.
        return "no root cause named, but the smoke run did not end at eos in arms A and B"
    if cause is None:
        parts = [
            f"no problem found: the adapter loads as upstream does ({upstream.matched} of the "
            f"model's {upstream.model_keys} keys) and every prompt ended at eos"
        ]
        if _comparable(upstream, alone) and upstream.generated == alone.generated:
            parts.append("but its generations are identical to the base alone")
        return "; ".join(parts)
    lead = next((f for f in findings if f.id == cause), None)
    parts = [lead.message if lead else cause]
    if cause == "LOAD_NOTHING" and ckpt.container_path:
        where = ckpt.container_subscripts
        parts = [
            f"loaded 0 of the model's {upstream.model_keys} keys because the weights are "
            f"nested under checkpoint{where}"
        ]
    if upstream.error and cause != "LOAD_FAILS":  # LOAD_FAILS's message says it already
        parts.append(f"upstream's load fails: {upstream.error}")
    elif _comparable(upstream, alone) and upstream.generated == alone.generated:
        parts.append("generations identical to the base alone")
    n = sum(upstream.outcomes.values())
    no_eos = n - upstream.outcomes.get("eos", 0)
    if no_eos and not upstream.error:
        parts.append(f"no eos within the limit on {no_eos} of {n} prompts")
    return "; ".join(parts)
