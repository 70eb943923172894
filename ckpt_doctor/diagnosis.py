"""``diagnose``: static findings, an A/B smoke run, then the root cause and the fixing command.

Arms of the smoke run: A, the file as upstream example.py loads it (strict=False); B, only its
adapter tensors on the base (what extraction gives); C, the base alone. Their outcomes and
whether A's generations equal C's are the behavioural evidence for the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.families import is_adapter_key
from ckpt_doctor.findings import Finding, finding
from ckpt_doctor.generate import GenerationConfig
from ckpt_doctor.inspection import inspect_checkpoint
from ckpt_doctor.reader import Checkpoint, find_tokenizer, open_checkpoint

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
    "KEY_PREFIX": "ckpt-doctor repair {path} -o fixed.pth",
    "LOAD_NOTHING": "ckpt-doctor extract {path} --base {base} -o adapter.pth",
    "GATE_SHAPE": "ckpt-doctor repair {path} --base {base} -o fixed.pth",
    "ADAPTER_MISSING": None,
    "ADAPTER_SHAPE": None,
    "ADAPTER_INERT": None,
    "BASE_MODIFIED": "ckpt-doctor repair {path} --base {base} --restore-base -o fixed.pth",
    "GATE_TANH_MISMATCH": "ckpt-doctor repair {path} --bake-tanh -o fixed.pth",
    "FP16_OVERFLOW": None,
    "ADAPTER_CONFIG": None,
}


@dataclass
class Arm:
    name: str
    outcomes: dict[str, int] = field(default_factory=dict)
    generated: list[list[int]] = field(default_factory=list)
    matched: int | None = None
    model_keys: int | None = None
    error: str | None = None


@dataclass
class Diagnosis:
    path: Path
    root_cause: str | None
    verdict: str
    fix: str | None
    findings: list[Finding]
    arms: list[Arm] = field(default_factory=list)
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "root_cause": self.root_cause,
            "verdict": self.verdict,
            "fix": self.fix,
            "arms": [vars(a) for a in self.arms],
            "findings": [f.to_json() for f in self.findings],
        }


def diagnose(
    path: Path,
    base_path: Path,
    *,
    tokenizer_path: Path | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 64,
) -> Diagnosis:
    try:
        ckpt = open_checkpoint(path)
    except CkptDoctorError as exc:
        found = finding(exc.code, exc.message, exc.hint) if exc.code in CAUSES else None
        return Diagnosis(path, exc.code, exc.message, None, [found] if found else [], [], 2)
    with ckpt, open_checkpoint(base_path) as base:
        report = inspect_checkpoint(ckpt, base=base)
        arms = _smoke_arms(ckpt, base, tokenizer_path, prompts, max_new_tokens)
    findings = report.findings
    ids = {f.id for f in findings if f.severity != "info"}
    if arms and arms[0].matched == 0:
        ids.add("LOAD_NOTHING")
    cause = next((c for c in CAUSES if c in ids), None)
    fix = CAUSES.get(cause) if cause else None
    fix = fix.format(path=path, base=base_path) if fix else None
    verdict = _verdict(cause, findings, arms, ckpt)
    return Diagnosis(path, cause, verdict, fix, findings, arms, 1 if cause else 0)


def _adapter_only(ckpt: Checkpoint) -> Checkpoint:
    tensors = {k: h for k, h in ckpt.canonical().items() if is_adapter_key(k)}
    return Checkpoint(ckpt.path, ckpt.format, tensors, args=ckpt.args, metadata=ckpt.metadata)


def _smoke_arms(
    ckpt: Checkpoint,
    base: Checkpoint,
    tokenizer_path: Path | None,
    prompts: list[str] | None,
    max_new_tokens: int,
) -> list[Arm]:
    from ckpt_doctor.smoke import smoke_generate

    tokenizer_path = tokenizer_path or base.tokenizer_path or find_tokenizer(base.path)
    if tokenizer_path is None:
        return []  # no tokenizer: the diagnosis rests on the static findings alone
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    plans = {
        "as upstream loads it": {"full": ckpt, "load_as": "upstream"},
        "extracted adapter on the base": {"adapter": _adapter_only(ckpt)},
        "base alone": {},
    }
    arms = []
    for name, kwargs in plans.items():
        arm = Arm(name)
        try:
            smoke = smoke_generate(
                base, tokenizer_path=tokenizer_path, prompts=prompts, config=config, **kwargs
            )
        except CkptDoctorError as exc:
            arm.error = f"[{exc.code}] {exc.message}"
        else:
            for r in smoke.results:
                arm.outcomes[r.outcome] = arm.outcomes.get(r.outcome, 0) + 1
            arm.generated = [r.generated_ids for r in smoke.results]
            arm.matched = len(smoke.load.from_file)
            arm.model_keys = smoke.load.model_keys
        arms.append(arm)
    return arms


def _verdict(cause: str | None, findings: list[Finding], arms: list[Arm], ckpt: Checkpoint) -> str:
    if cause is None:
        return "no problem found: the adapter loads and changes the model"
    lead = next((f for f in findings if f.id == cause), None)
    parts = [lead.message if lead else cause]
    if arms:
        upstream, _, alone = arms
        if cause == "LOAD_NOTHING" and ckpt.container_path:
            where = "".join(f"[{k!r}]" for k in ckpt.container_path)
            parts = [
                f"loaded 0 of {upstream.model_keys} model keys because the weights are nested "
                f"under checkpoint{where}"
            ]
        if upstream.error:
            parts.append(f"upstream's load fails: {upstream.error}")
        elif upstream.generated == alone.generated:
            parts.append("generations identical to the base alone")
        n = sum(upstream.outcomes.values())
        no_eos = n - upstream.outcomes.get("eos", 0)
        if no_eos and not upstream.error:
            parts.append(f"no eos within the limit on {no_eos} of {n} prompts")
    return "; ".join(parts)
