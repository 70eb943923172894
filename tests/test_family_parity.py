"""Parity with each family's own code on the same weights: the reference model gives the tokens
(and first-step logits) that upstream LLaMA-Adapter v2 chat, HF transformers and PEFT gave on
the committed fixtures in fixtures/families (expected.json, made by
fixtures/make_family_fixtures.py --expected with that code installed; CI needs none of it).

Greedy, float32 on the CPU. Tolerance for the logits: 2e-4 absolute (the fixtures' logits reach
about +-30; the HF model itself differs from Meta's layout by up to 1.1e-4 in fp32); every
recorded run's smallest top-1/top-2 margin is >= 0.09, far above that, so tokens must match
exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_doctor.generate import GenerationConfig
from ckpt_doctor.loading import load_model
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.smoke import smoke_generate

FAMILIES = Path(__file__).resolve().parents[1] / "fixtures" / "families"
EXPECTED = json.loads((FAMILIES / "expected.json").read_text())
LOGITS = load_file(str(FAMILIES / "expected_logits.safetensors"))
LOGIT_ATOL = 2e-4

# run name -> (base, adapter file or None, how it is passed)
RUNS = {
    "meta-base": ("meta-base", None, None),
    "hf-base": ("hf-base", None, None),
    "v2-chat": ("meta-base", "v2-chat/adapter.pth", "adapter"),
    "v2-chat-prompts": ("meta-base", "v2-chat-prompts/adapter.pth", "adapter"),
    "peft-adaption-prompt": ("hf-base", "peft-adaption-prompt", "adapter"),
    # PEFT's own unmerged LoRA (W x + scale * B(A x)) vs the merged weights ckpt-doctor runs.
    "peft-lora": ("hf-base", "peft-lora", "adapter"),
}


def _generate(base: str, extra: str | None, kind: str | None, *, load_as: str = "strict"):
    run = EXPECTED["runs"]
    config = GenerationConfig(max_new_tokens=EXPECTED["max_new_tokens"], template="alpaca")
    instructions = [r["instruction"] for r in run["meta-base"]["results"]]
    with open_checkpoint(FAMILIES / base) as b:
        kwargs = {}
        if extra is not None:
            kwargs[kind] = open_checkpoint(FAMILIES / extra)
        report = smoke_generate(
            b, prompts=instructions, config=config, dtype="float32", device="cpu",
            attention="reference", load_as=load_as, **kwargs,
        )  # fmt: skip
    return report


@pytest.mark.parametrize("name", list(RUNS))
def test_tokens_equal_the_familys_own_code(name):
    expected = EXPECTED["runs"][name]["results"]
    report = _generate(*RUNS[name])
    for got, want in zip(report.results, expected, strict=True):
        assert got.prompt_ids == want["prompt_ids"]
        assert got.generated_ids == want["generated_ids"], (name, want["instruction"])
        ended = len(want["generated_ids"]) < EXPECTED["max_new_tokens"]
        assert (got.outcome == "eos") == ended


@pytest.mark.parametrize("name", list(RUNS))
def test_first_step_logits_match(name):
    base, extra, kind = RUNS[name]
    with open_checkpoint(FAMILIES / base) as b:
        kwargs = {kind: open_checkpoint(FAMILIES / extra)} if extra else {}
        model, _ = load_model(b, dtype="float32", max_seq_len=64, **kwargs)
    want = LOGITS[name]
    for i, result in enumerate(EXPECTED["runs"][name]["results"]):
        ids = torch.tensor([result["prompt_ids"]])
        with torch.inference_mode():
            got = model(ids, 0, model.new_cache(1, ids.shape[1]))[0]
        torch.testing.assert_close(got, want[i], atol=LOGIT_ATOL, rtol=0)


def test_v2_chat_training_checkpoint_as_upstream_loads_it():
    """checkpoint-1.pth ({'model', 'optimizer', ...}) loads through ['model'] as chat_demo.py
    does: the released adapter's tokens, strictly and as upstream loads it."""
    want = [r["generated_ids"] for r in EXPECTED["runs"]["v2-chat-prompts"]["results"]]
    for load_as in ("strict", "upstream"):
        report = _generate("meta-base", "v2-chat-prompts/checkpoint-1.pth", "full", load_as=load_as)
        assert [r.generated_ids for r in report.results] == want, load_as
        assert (
            len(report.load.from_file)
            == EXPECTED["runs"]["v2-chat-prompts"]["loaded"]["file_keys_loaded"]
        )


def test_peft_on_the_meta_base_and_converted_to_v1(tmp_path):
    """PEFT's adapter runs on the Meta copy of its base, and converted to LLaMA-Adapter v1, to
    PEFT's own tokens (a conversion ckpt-doctor calls exact is exact)."""
    from ckpt_doctor.convert import convert

    want = [r["generated_ids"] for r in EXPECTED["runs"]["peft-adaption-prompt"]["results"]]
    report = _generate("meta-base", "peft-adaption-prompt", "adapter")
    assert [r.generated_ids for r in report.results] == want
    out = tmp_path / "v1.safetensors"
    with (
        open_checkpoint(FAMILIES / "peft-adaption-prompt") as peft,
        open_checkpoint(FAMILIES / "meta-base") as base,
    ):
        result = convert(peft, out, to="llama-adapter-v1", base=base)
    assert result.max_logit_diff == 0.0 and not result.findings
    report = _generate("meta-base", str(out), "adapter")
    assert [r.generated_ids for r in report.results] == want


@pytest.mark.parametrize("full", ["pytorch_model.bin", "model.safetensors"])
def test_peft_adapter_verifies_against_a_full_peft_state_dict(tmp_path, full):
    """A PeftModel's full state dict (no config.json beside it: the base's config serves),
    extracted back into PEFT's own adapter files, bit for bit, and verified."""
    from ckpt_doctor.extraction import extract
    from ckpt_doctor.verification import verify

    source = FAMILIES / "peft-full" / full
    out = tmp_path / "adapter"
    with open_checkpoint(source) as ckpt, open_checkpoint(FAMILIES / "hf-base") as base:
        extract(ckpt, out, base=base)
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(FAMILIES / "peft-adaption-prompt" / "adapter_model.safetensors"))
    assert set(got) == set(want)
    # The full state dict holds the adapter in the model's fp16, PEFT's own file in fp32.
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    with (
        open_checkpoint(FAMILIES / "peft-adaption-prompt") as adapter,
        open_checkpoint(FAMILIES / "hf-base") as base,
        open_checkpoint(source) as ckpt,
    ):
        report = verify(adapter, base=base, full=ckpt)
    checks = {c.name: c for c in report.checks}
    assert checks["complete"].passed and checks["strict load"].passed


def test_peft_lora_on_the_meta_base():
    """PEFT's LoRA, trained on the HF layout, on the Meta copy of its base: q_proj / k_proj B
    rows are un-permuted like the weights', so the tokens are PEFT's."""
    want = [r["generated_ids"] for r in EXPECTED["runs"]["peft-lora"]["results"]]
    report = _generate("meta-base", "peft-lora", "adapter")
    assert [r.generated_ids for r in report.results] == want
    assert len(report.load.from_file) == 56  # 28 linears, A and B each


def test_the_peft_lora_fixture_is_what_peft_writes_and_loads():
    """Recorded by make_family_fixtures.py --expected-lora with PEFT itself: its save_pretrained
    writes the same tensors, its full state dict is lora_full's, and its loader takes nothing
    from an empty dict or from names without base_model.model. (what LOAD_NOTHING predicts)."""
    loaded = EXPECTED["runs"]["peft-lora"]["loaded"]
    assert loaded["peft_save_same_tensors"] and not loaded["peft_save_config_differences"]
    assert loaded["full_state_dict_new_naming_equal"]
    assert loaded["lora_B_loaded_from"] == {
        "the adapter": 28,
        "an empty dict (the alpaca-lora save bug)": 0,
        "names without base_model.model.": 0,
    }
    assert all(EXPECTED["runs"]["peft-lora"]["differs_from_hf-base"])
