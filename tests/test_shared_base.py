"""diagnose loads the base once and swaps each arm's adapter in and out (loading.attach): every
arm's tokens equal a separate smoke-generate's, for each family the model runs (a LoRA's merged
weights too); the timings block of both commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_doctor import loading, timings
from ckpt_doctor.diagnosis import ARM_ADAPTER, ARM_BASE, ARM_UPSTREAM, _adapter_only, diagnose
from ckpt_doctor.generate import GenerationConfig
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.smoke import smoke_generate

ROOT = Path(__file__).resolve().parents[1]
WORLD, FAMILIES = ROOT / "fixtures" / "world", ROOT / "fixtures" / "families"
CASES = {  # family: (the file diagnosed, its base, a prompt)
    "llama-adapter-v1": (WORLD / "checkpoint-4.pth", WORLD / "base", "Repeat the word dog twice."),
    "llama-adapter-v2-chat": (
        FAMILIES / "v2-chat-prompts" / "checkpoint-1.pth",
        FAMILIES / "meta-base",
        "Tell me about alpacas.",
    ),
    "peft-adaption-prompt": (
        FAMILIES / "peft-adaption-prompt",
        FAMILIES / "hf-base",
        "List three primary colors.",
    ),
    # A LoRA is merged into the base's weights: the arms swap whole weights in and out.
    "peft-lora": (FAMILIES / "peft-lora", FAMILIES / "hf-base", "Write a haiku about the sea."),
}


@pytest.mark.parametrize(
    ("family", "dtype"),
    [
        ("llama-adapter-v1", "float32"),
        ("llama-adapter-v2-chat", "float32"),
        ("llama-adapter-v2-chat", "float16"),  # its norms and gates in fp32 on a 16-bit base
        ("peft-adaption-prompt", "float32"),
        ("peft-lora", "float32"),
    ],
)
def test_each_arm_gives_a_separate_smoke_generates_tokens(monkeypatch, one_thread, family, dtype):
    path, base_path, prompt = CASES[family]
    loads = []
    real = loading.load_base
    monkeypatch.setattr(
        "ckpt_doctor.smoke.load_base", lambda *a, **k: loads.append(1) or real(*a, **k)
    )
    config = GenerationConfig(max_new_tokens=10)
    result = diagnose(path, base_path, prompts=[prompt], config=config, dtype=dtype, gate_fn=None)
    assert len(loads) == 1  # one base load for the three arms
    arms = {a.name: a for a in result.arms}
    assert all(a.error is None for a in arms.values()), [a.error for a in arms.values()]
    with open_checkpoint(path) as ckpt, open_checkpoint(base_path) as base:
        separate = {
            ARM_UPSTREAM: {"full": ckpt, "load_as": "upstream"},
            ARM_ADAPTER: {"adapter": _adapter_only(ckpt)},
            ARM_BASE: {},
        }
        for name, kwargs in separate.items():
            alone = smoke_generate(base, prompts=[prompt], config=config, dtype=dtype, **kwargs)
            assert arms[name].generated == [r.generated_ids for r in alone.results], name
            assert arms[name].matched == len(alone.load.from_file)
            assert arms[name].gates == alone.gates
    assert len(loads) == 4  # and one per separate run
    # Upstream's load matched nothing in the v1 training checkpoint: arm A is the base, and
    # takes arm C's generations instead of running them again (same tokens, shown above).
    assert arms[ARM_UPSTREAM].reused_base_run is (family == "llama-adapter-v1")
    assert not arms[ARM_ADAPTER].reused_base_run and not arms[ARM_BASE].reused_base_run
    # The adapter changes the tokens (else the comparison would prove little).
    assert arms[ARM_ADAPTER].generated != arms[ARM_BASE].generated


def test_attach_undo_gives_the_base_back_bit_for_bit(one_thread):
    """After an adapter went in and out, every parameter, layout and the adapter K/V are the
    base's again: the same logits as a base never touched."""
    import torch

    path, base_path, _ = CASES["llama-adapter-v2-chat"]
    with open_checkpoint(base_path) as base, open_checkpoint(path) as ckpt:
        model = loading.load_base(base, max_seq_len=32)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        tokens = torch.tensor([[1, 5, 9, 13, 20]])
        with torch.inference_mode():
            model.lay_out_weights(rows=1)  # laid out fused, then the v2 scales unfuse it
            want = model(tokens, 0, model.new_cache(1, 32))
            _, undo = loading.attach(model, loading.plan_adapter(base, full=ckpt))
            assert model.layers[0].attention.wq_scale is not None
            model.lay_out_weights(rows=1)
            changed = model(tokens, 0, model.new_cache(1, 32))
            undo()
            model.lay_out_weights(rows=1)
            got = model(tokens, 0, model.new_cache(1, 32))
        assert not torch.equal(changed, want)
        assert torch.equal(got, want)
        assert model.layers[0].attention.wq_scale is None and model.args.adapter_len == 0
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_timings_in_the_json_of_smoke_generate_and_diagnose(one_thread):
    from typer.testing import CliRunner

    from ckpt_doctor.cli import app

    path, base_path, prompt = CASES["llama-adapter-v1"]
    common = ["--prompt", prompt, "--max-new-tokens", "6", "--json"]
    smoke = CliRunner().invoke(app, ["smoke-generate", "--base", str(base_path), "--full",
                                     str(path), *common])  # fmt: skip
    diag = CliRunner().invoke(app, ["diagnose", str(path), "--base", str(base_path), *common])
    for result in (smoke, diag):
        assert result.exit_code in (0, 1), result.output
        t = json.loads(result.stdout)["timings"]
        assert set(timings.PHASES) <= t.keys()
        assert t["read"] > 0 and t["build"] > 0 and t["prefill"] > 0 and t["decode"] > 0
        assert t["host_to_device"] == 0  # the CPU: nothing moves
        assert t["total"] == pytest.approx(sum(t[p] for p in timings.PHASES), abs=1e-3)
    doc = json.loads(diag.stdout)
    assert doc["timings"]["checks"] > 0
    arms = [a["timings"] for a in doc["arms"]]
    assert [a["reused_base_run"] for a in doc["arms"]] == [True, False, False]
    assert arms[0]["decode"] == 0 and all(a["decode"] > 0 for a in arms[1:])
    # The arms' phases are part of the whole (and nothing is counted twice).
    assert sum(a["decode"] for a in arms) == pytest.approx(doc["timings"]["decode"], abs=1e-3)
    assert json.loads(smoke.stdout)["world_size"] == 1


def test_debug_shows_the_timings_on_stderr(one_thread):
    from typer.testing import CliRunner

    from ckpt_doctor.cli import app

    path, base_path, prompt = CASES["llama-adapter-v1"]
    args = ["smoke-generate", "--base", str(base_path), "--full", str(path), "--prompt", prompt]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--debug"])
    assert result.exit_code in (0, 1), result.output
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("timings: "))
    assert "read" in line and "prefill" in line and "decode" in line and "total" in line
    quiet = CliRunner().invoke(app, [*args, "--max-new-tokens", "4"])
    assert "timings: " not in quiet.stderr


def test_recorder_phases_are_exclusive_and_nest():
    with timings.recording() as outer:
        with timings.phase("build"), timings.phase("read"):
            pass
        with timings.recording() as inner, timings.phase("decode"):
            pass
    assert inner.seconds["decode"] > 0
    assert outer.seconds["decode"] == inner.seconds["decode"]
    assert outer.to_json()["total"] == pytest.approx(sum(outer.seconds.values()), abs=1e-3)
    with timings.phase("read"):  # no recorder: nothing happens
        pass
