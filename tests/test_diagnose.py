"""``diagnose`` names the right root cause for each broken variant of the fixture world.

Must show: on a broken variant of the world's checkpoint for each of nested container, ``module.``
prefix, all gates zero, legacy scalar gate, large gate, drifted base tensors, resized vocab, NaN in
the adapter, empty file, truncated file and pickle payload, ``diagnose`` names the right finding
id as the root cause; on the healthy adapter it raises no error. One test per variant.

The variants are derived from fixtures/world/checkpoint-4.pth into a temporary directory (the
fixtures are never written) once per module; each diagnose runs a few held-out prompts only.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from ckpt_doctor.diagnosis import CAUSES, Diagnosis, diagnose, fix_command
from ckpt_doctor.errors import CkptDoctorError, ModelLoadError, UnreadableError, UsageError
from ckpt_doctor.families import LLAMA_ADAPTER_V1
from ckpt_doctor.findings import finding
from tests.trusted_load import load_training_checkpoint

WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"
BASE, CKPT = WORLD / "base", WORLD / "checkpoint-4.pth"
MAX_NEW_TOKENS = 48
N_PROMPTS = 4
runner = CliRunner()


class _Payload:
    """Unpickling this runs ``os.system(command)``: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@dataclass
class Variants:
    root: Path
    files: dict[str, Path]
    marker: Path  # the file the pickle payload would create if it ever ran


def _load_training_checkpoint() -> dict:
    return load_training_checkpoint(CKPT)


def _gate_names(adapter: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in adapter if k.endswith("attention.gate")]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return json.loads((WORLD / "prompts.json").read_text())["held_out"][:N_PROMPTS]


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> Variants:
    root = tmp_path_factory.mktemp("diagnose-variants")
    model = _load_training_checkpoint()["model"]
    adapter = {k: v.clone() for k, v in model.items() if LLAMA_ADAPTER_V1.is_trained(k)}
    gates = _gate_names(adapter)
    assert adapter and len(gates) == 4  # the world: 4 layers, a gate each
    files: dict[str, Path] = {"nested": CKPT}

    def save(name: str, obj: object) -> None:
        files[name] = root / f"{name}.pth"
        torch.save(obj, files[name])

    save("healthy", adapter)
    save("prefix", {f"module.{k}": v for k, v in adapter.items()})
    save("zero_gates", {k: torch.zeros_like(v) if k in gates else v for k, v in adapter.items()})
    # Legacy adapters stored one scalar per layer: shape [1], here the mean of the heads.
    save("scalar_gates", {k: v.mean().reshape(1) if k in gates else v for k, v in adapter.items()})
    large = {k: v.clone() for k, v in adapter.items()}
    large["layers.3.attention.gate"].view(-1)[0] = 2.0
    save("large_gate", large)
    drifted = {k: v.clone() for k, v in model.items()}
    drifted["layers.0.attention.wq.weight"][0, :4] += 0.25
    save("drifted", drifted)
    resized = {k: v.clone() for k, v in model.items()}
    for name in ("tok_embeddings.weight", "output.weight"):
        t = resized[name]
        resized[name] = torch.cat([t, torch.zeros(2, t.shape[1], dtype=t.dtype)])
    save("resized_vocab", resized)
    nan = {k: v.clone() for k, v in adapter.items()}
    nan["adapter_query.weight"][3, 5] = float("nan")
    save("nan", nan)
    files["empty"] = root / "empty.pth"
    files["empty"].write_bytes(b"")
    data = CKPT.read_bytes()
    files["truncated"] = root / "truncated.pth"
    files["truncated"].write_bytes(data[: len(data) // 2])
    marker = root / "pwned"
    save("pickle", {"model": adapter, "payload": _Payload(f"touch {marker}")})
    return Variants(root, files, marker)


@pytest.fixture(scope="module")
def run(variants, prompts):
    """Diagnose a variant by name, once per module."""
    done: dict[str, Diagnosis] = {}

    def go(name: str) -> Diagnosis:
        if name not in done:
            done[name] = diagnose(
                variants.files[name], BASE, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS
            )
        return done[name]

    return go


def _ids(diagnosis: Diagnosis) -> set[str]:
    return {f.id for f in diagnosis.findings}


def _arms(diagnosis: Diagnosis) -> dict[str, object]:
    upstream, extracted, alone = diagnosis.arms
    assert upstream.name == "as upstream loads it"
    assert extracted.name == "extracted adapter on the base"
    assert alone.name == "base alone"
    return {"upstream": upstream, "extracted": extracted, "alone": alone}


def _assert_cause(diagnosis: Diagnosis, cause: str, *, exit_code: int = 1) -> None:
    assert diagnosis.root_cause == cause, (diagnosis.root_cause, diagnosis.verdict)
    assert diagnosis.exit_code == exit_code
    assert diagnosis.verdict
    template = CAUSES[cause]
    if template is None:
        assert diagnosis.fix is None
    else:
        # As the shell reads it (the paths are quoted where they need it): these words.
        words = [
            w.format(path=diagnosis.path, base=BASE, ext=".pth") for w in shlex.split(template)
        ]
        assert shlex.split(diagnosis.fix) == words


def test_fix_commands_are_shell_quoted(tmp_path):
    """A path with spaces or brackets copies and runs as printed."""
    path, base = tmp_path / "my run [v2]" / "checkpoint 4.pth", tmp_path / "base"
    cmd = fix_command(finding("LOAD_NOTHING", "m", "h"), path, base)
    assert shlex.split(cmd) == ["ckpt-doctor", "extract", str(path), "--base", str(base), "-o",
                                "adapter.pth"]  # fmt: skip
    assert fix_command(finding("NONFINITE", "m", "h"), path, base) is None
    # A gate shape broadcasting cannot mend gets no repair command (it would write nothing).
    assert fix_command(finding("GATE_SHAPE", "m", "h", repairable=False), path, base) is None
    assert "repair" in fix_command(finding("GATE_SHAPE", "m", "h", repairable=True), path, base)


# --------------------------------------------------------------------------- variants


def test_nested_container_loads_nothing(run, prompts):
    d = run("nested")
    _assert_cause(d, "LOAD_NOTHING")
    assert "nested" in d.verdict and "0 of" in d.verdict
    assert "['model']" in d.verdict
    assert d.fix is not None and d.fix.startswith("ckpt-doctor extract ")
    assert shlex.split(d.fix)[2:5] == [str(CKPT), "--base", str(BASE)]
    assert "CONTAINER_NESTED" in _ids(d)
    arms = _arms(d)
    upstream, extracted, alone = arms["upstream"], arms["extracted"], arms["alone"]
    assert upstream.error is None and upstream.matched == 0 and upstream.model_keys > 0
    assert upstream.generated == alone.generated  # loading nothing leaves the base alone
    assert len(upstream.generated) == len(prompts)
    assert upstream.outcomes.get("eos", 0) == 0
    assert extracted.matched > 0
    assert extracted.outcomes.get("eos", 0) >= 0.75 * len(prompts)
    assert extracted.generated != alone.generated


def test_module_prefix(run):
    d = run("prefix")
    # Both hold (nothing matches as saved), but the prefix is the specific cause.
    assert {"KEY_PREFIX", "LOAD_NOTHING"} <= _ids(d)
    _assert_cause(d, "KEY_PREFIX")
    assert d.fix.startswith("ckpt-doctor repair ")
    assert "module." in d.verdict
    arms = _arms(d)
    assert arms["upstream"].matched == 0
    assert arms["upstream"].generated == arms["alone"].generated
    assert arms["extracted"].matched > 0  # canonical names: the prefix is stripped


def test_all_gates_zero_is_inert(run):
    d = run("zero_gates")
    _assert_cause(d, "ADAPTER_INERT")
    arms = _arms(d)
    assert arms["upstream"].matched > 0  # the keys load; they just do nothing
    assert arms["upstream"].generated == arms["alone"].generated


def test_legacy_scalar_gate(run):
    d = run("scalar_gates")
    _assert_cause(d, "GATE_SHAPE")
    assert d.fix.startswith("ckpt-doctor repair ") and "--base" in d.fix
    arms = _arms(d)
    assert arms["upstream"].error and "GATE_SHAPE" in arms["upstream"].error


def test_large_gate_tanh_mismatch(run):
    d = run("large_gate")
    _assert_cause(d, "GATE_TANH_MISMATCH")
    assert "--bake-tanh" in d.fix
    (lead,) = [f for f in d.findings if f.id == "GATE_TANH_MISMATCH"]
    assert lead.severity == "warning"


def test_drifted_base_tensors(run):
    d = run("drifted")
    _assert_cause(d, "BASE_MODIFIED")
    words = shlex.split(d.fix)
    assert "--restore-base" in words and words[words.index("--base") + 1] == str(BASE)
    assert "layers.0.attention.wq.weight" in d.verdict
    assert _arms(d)["upstream"].matched == _arms(d)["upstream"].model_keys  # flat: all match


def test_resized_vocab(run):
    d = run("resized_vocab")
    _assert_cause(d, "VOCAB_MISMATCH")
    assert all(f.severity == "error" for f in d.findings if f.id == "VOCAB_MISMATCH")
    assert "258" in d.verdict and "256" in d.verdict
    assert _arms(d)["upstream"].error  # load_state_dict raises on the size mismatch


def test_nan_in_adapter(run):
    d = run("nan")
    _assert_cause(d, "NONFINITE")
    assert "adapter_query.weight" in d.verdict


def test_empty_file(run):
    d = run("empty")
    _assert_cause(d, "EMPTY", exit_code=2)
    assert d.arms == []


def test_truncated_file(run):
    d = run("truncated")
    _assert_cause(d, "UNREADABLE", exit_code=2)
    assert d.arms == []


def test_pickle_payload_is_refused_and_never_runs(run, variants):
    d = run("pickle")
    _assert_cause(d, "UNSAFE_PICKLE", exit_code=2)
    assert "system" in d.verdict
    assert d.arms == []
    assert not variants.marker.exists()


def test_healthy_adapter(run, prompts):
    d = run("healthy")
    assert d.root_cause is None and d.fix is None and d.exit_code == 0
    assert not [f for f in d.findings if f.severity == "error"]
    arms = _arms(d)
    assert all(a.error is None for a in arms.values())
    assert arms["upstream"].matched > 0
    assert arms["upstream"].generated == arms["extracted"].generated
    assert arms["upstream"].outcomes.get("eos", 0) >= 0.75 * len(prompts)


def test_every_root_cause_is_a_finding_id(run, variants):
    """The root cause is always one of the diagnosis's findings, so --json carries it in full."""
    for name in variants.files:
        d = run(name)
        if d.root_cause is not None:
            assert d.root_cause in _ids(d), name


# --------------------------------------------------------------------------- the CLI


def _cli(path: Path, prompts: list[str]) -> tuple[int, dict]:
    args = ["diagnose", str(path), "--base", str(BASE), "--json"]
    args += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    for p in prompts:
        args += ["--prompt", p]
    result = runner.invoke(app, args)
    return result.exit_code, json.loads(result.stdout)  # exactly one JSON document


def test_cli_nested_exits_1(variants, prompts):
    code, doc = _cli(variants.files["nested"], prompts)
    assert code == 1
    assert doc["root_cause"] == "LOAD_NOTHING"
    assert doc["fix"].startswith("ckpt-doctor extract ")
    upstream = doc["arms"][0]
    assert upstream["name"] == "as upstream loads it" and upstream["matched"] == 0
    assert {f["id"] for f in doc["findings"]} >= {"LOAD_NOTHING", "CONTAINER_NESTED"}


def test_cli_healthy_exits_0(variants, prompts):
    code, doc = _cli(variants.files["healthy"], prompts)
    assert code == 0
    assert doc["root_cause"] is None and doc["fix"] is None
    assert all(f["severity"] != "error" for f in doc["findings"])


def test_cli_empty_exits_2(variants, prompts):
    code, doc = _cli(variants.files["empty"], prompts)
    assert code == 2
    assert doc["root_cause"] == "EMPTY"
    assert [f["id"] for f in doc["findings"]] == ["EMPTY"]


# --------------------------------------------------------------------------- review fixes


def test_no_tokenizer_is_the_usage_error_smoke_generate_raises(tmp_path, prompts):
    """Without a tokenizer the A/B run cannot happen: say so, as smoke-generate does."""
    base = tmp_path / "base"
    base.mkdir()
    for f in BASE.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UsageError) as info:
        diagnose(CKPT, base, prompts=prompts[:1], max_new_tokens=4)
    assert "--tokenizer" in info.value.hint
    result = runner.invoke(app, ["diagnose", str(CKPT), "--base", str(base), "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["error"]["id"] == "USAGE"
    d = diagnose(
        CKPT, base, tokenizer_path=WORLD / "tokenizer.model", prompts=prompts[:1], max_new_tokens=4
    )
    assert len(d.arms) == 3 and d.root_cause == "LOAD_NOTHING"


def test_no_adapter_is_no_clean_bill_of_health():
    """The base diagnosed against itself: no adapter loads, no prompt ends, exit 1."""
    d = diagnose(BASE, BASE, prompts=["Repeat the word dog twice."], max_new_tokens=8)
    assert d.root_cause == "ADAPTER_MISSING" and d.exit_code == 1
    assert "no problem found" not in d.verdict and "adapter loads" not in d.verdict
    upstream, extracted, _ = d.arms
    assert extracted.error and "no adapter" in extracted.error
    assert upstream.outcomes == {"max_tokens": 1}
    assert {"ADAPTER_MISSING", "NO_EOS"} <= _ids(d)


def test_an_arm_that_should_work_but_does_not_end_makes_exit_1(prompts, variants):
    """The healthy adapter with too few tokens to finish: no static cause, but not clean."""
    d = diagnose(variants.files["healthy"], BASE, prompts=prompts[:2], max_new_tokens=2)
    assert d.exit_code == 1 and d.root_cause in ("NO_EOS", "LOOP")
    lead = next(f for f in d.findings if f.id == d.root_cause)
    assert lead.severity == "error" and lead.evidence["arm"] in (d.arms[0].name, d.arms[1].name)
    assert "no problem found" not in d.verdict


def test_load_nothing_is_one_error_with_one_message(run):
    """Predicted from the names or seen in arm A's load: the same finding, reported once."""
    d = run("nested")
    (f,) = [f for f in d.findings if f.id == "LOAD_NOTHING"]
    (seen,) = [f for f in d.arms[0].findings if f.id == "LOAD_NOTHING"]
    assert f.severity == seen.severity == "error"
    assert f.message == seen.message and f.hint == seen.hint
    assert f"0 of the model's {d.arms[0].model_keys} keys" in f.message


class _Harmless:
    """A global outside the allowlist that runs nothing: datetime.timedelta(1)."""

    def __reduce__(self):
        import datetime

        return (datetime.timedelta, (1,))


def test_diagnose_takes_trust_pickle_as_its_hint_says(tmp_path, prompts):
    model = _load_training_checkpoint()["model"]
    adapter = {k: v.clone() for k, v in model.items() if LLAMA_ADAPTER_V1.is_trained(k)}
    path = tmp_path / "odd.pth"
    torch.save({"model": adapter, "extra": _Harmless()}, path)
    args = ["diagnose", str(path), "--base", str(BASE), "--max-new-tokens", "4", "--json"]
    args += ["--prompt", prompts[0]]
    refused = runner.invoke(app, args)
    doc = json.loads(refused.stdout)
    assert refused.exit_code == 2 and doc["root_cause"] == "UNSAFE_PICKLE"
    assert "--trust-pickle" in doc["findings"][0]["hint"]
    trusted = runner.invoke(app, [*args, "--trust-pickle"])
    assert trusted.exit_code in (0, 1), trusted.output
    assert json.loads(trusted.stdout)["root_cause"] != "UNSAFE_PICKLE"


# --------------------------------------------------------------------------- failed arms


def test_every_arm_failing_the_same_way_is_raised_not_a_clean_bill(tmp_path, variants, prompts):
    """An unreadable tokenizer fails all three arms alike: nothing was diagnosed, exit 2."""
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"garbage-not-a-model")
    with pytest.raises(UnreadableError):
        diagnose(variants.files["healthy"], BASE, tokenizer_path=bad, prompts=prompts[:1])
    args = ["diagnose", str(variants.files["healthy"]), "--base", str(BASE), "--json"]
    result = runner.invoke(app, [*args, "--tokenizer", str(bad), "--prompt", prompts[0]])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["id"] == "UNREADABLE"


def _failing_arm(monkeypatch, fails: Callable[[dict], CkptDoctorError | None]) -> None:
    """smoke_generate as diagnose calls it, but raising for the arms ``fails`` picks."""
    import ckpt_doctor.smoke as smoke

    real = smoke.smoke_generate

    def fake(base, **kwargs):
        error = fails(kwargs)
        if error is not None:
            raise error
        return real(base, **kwargs)

    monkeypatch.setattr(smoke, "smoke_generate", fake)


def test_a_failed_extracted_adapter_arm_is_a_finding(monkeypatch, variants, prompts):
    boom = UsageError("the adapter arm broke", hint="fix the adapter arm")
    _failing_arm(monkeypatch, lambda kw: boom if "adapter" in kw else None)
    d = diagnose(variants.files["healthy"], BASE, prompts=prompts[:1], max_new_tokens=4)
    assert d.exit_code == 1 and "no problem found" not in d.verdict
    (failed,) = [f for f in d.findings if f.id == "SMOKE_FAILED"]  # USAGE has no finding id
    assert failed.severity == "error" and failed.hint == "fix the adapter arm"
    assert failed.evidence["arm"] == "extracted adapter on the base"
    assert "the adapter arm broke" in failed.message
    assert d.arms[1].error_code == "USAGE" and d.arms[0].error is None


def test_a_failed_upstream_arm_is_never_compared_with_the_base(monkeypatch, variants, prompts):
    """An errored arm generated nothing: [] == [] is no evidence of anything."""
    boom = ModelLoadError("the upstream arm broke", code="BASE_MISMATCH", hint="h")
    _failing_arm(monkeypatch, lambda kw: boom if kw.get("load_as") == "upstream" else None)
    d = diagnose(variants.files["healthy"], BASE, prompts=prompts[:1], max_new_tokens=4)
    assert d.root_cause == "BASE_MISMATCH" and d.exit_code == 1
    (lead,) = [f for f in d.findings if f.id == "BASE_MISMATCH"]
    assert lead.severity == "error" and lead.evidence["arm"] == "as upstream loads it"
    assert "identical" not in d.verdict and "upstream's load fails" in d.verdict


def test_clean_bill_only_when_both_arms_ran_and_ended_at_eos():
    from ckpt_doctor.diagnosis import Arm, _healthy

    ok = Arm("a", outcomes={"eos": 2})
    assert _healthy([ok, Arm("b", outcomes={"eos": 1}), Arm("c")])
    assert not _healthy([ok, Arm("b", error="[X] broke"), Arm("c")])
    assert not _healthy([ok, Arm("b"), Arm("c")])  # ran no prompt
    assert not _healthy([ok, Arm("b", outcomes={"eos": 1, "nonfinite": 1}), Arm("c")])


def test_dtype_and_device_reach_every_smoke_arm(monkeypatch):
    """--dtype / --device go to the arms (a NONFINITE hint may say "--dtype float32")."""
    import ckpt_doctor.smoke as smoke

    seen, original = [], smoke.smoke_generate

    def spy(base, **kwargs):
        seen.append((kwargs["dtype"], kwargs["device"]))
        return original(base, **kwargs)

    monkeypatch.setattr(smoke, "smoke_generate", spy)
    prompt = ["Repeat the word dog twice."]
    d = diagnose(CKPT, BASE, prompts=prompt, max_new_tokens=4, dtype="bfloat16", device="cpu")
    assert seen == [("bfloat16", "cpu")] * 3 and len(d.arms) == 3
