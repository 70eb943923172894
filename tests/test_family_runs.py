"""The families the reference model runs (LLaMA-Adapter v2 chat, PEFT's adaption prompt), end
to end through smoke-generate, diagnose, verify and convert on the fixture world's base; and
the families it does not run refused with the reason.

Parity with each family's own code is in test_family_parity.py; here the arms and commands
are checked against each other (strict vs upstream loading, a conversion vs its source).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from fixtures.make_fixtures import hf_config, hf_state_dict, save_safetensors, save_zip
from tests import family_files as ff
from tests.trusted_load import load_training_checkpoint

runner = CliRunner()
CFG = ff.WORLD_CFG
BASE = ff.WORLD / "base"
PROMPTS = ["Repeat the word dog twice.", "Name the opposite of up."]


def run(*args: object) -> tuple[int, dict]:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    return result.exit_code, json.loads(result.stdout)


def smoke(*args: object, tokens: int = 10) -> tuple[int, dict]:
    prompts = [x for p in PROMPTS for x in ("--prompt", p)]
    return run("smoke-generate", "--base", BASE, *args, *prompts, "--max-new-tokens", tokens)


def generated(doc: dict) -> list[list[int]]:
    return [r["generated_ids"] for r in doc["results"]]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    chat = ff.v2_chat(CFG, prompt=True)
    out = {
        "chat_ckpt": save_zip(ff.v2_chat_checkpoint(chat), root / "chat-ckpt.pth"),
        "chat_flat": save_zip(chat, root / "chat-flat.pth"),
        "peft": ff.peft_adapter_dir(root / "peft", CFG),
        "mm": save_zip(
            ff.v2_multimodal_release(ff.v2_multimodal(CFG, lora=False), lora=False),
            root / "mm.pth",
        ),
    }
    meta = torch.load(BASE / "consolidated.00.pth", weights_only=True)
    hf = root / "hf"
    save_safetensors(hf_state_dict(meta, CFG.n_heads), hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(hf_config(CFG)))
    (hf / "tokenizer.model").write_bytes((ff.WORLD / "tokenizer.model").read_bytes())
    out["hf"] = hf
    full = ff.peft_full_state(hf_state_dict(meta, CFG.n_heads), out["peft"])
    out["peft_full"] = save_zip(full, root / "trainer" / "pytorch_model.bin")
    (root / "trainer" / "config.json").write_text(json.dumps(hf_config(CFG)))
    # PEFT's names without its wrapper: its loader matches none of them (the seed bug).
    from safetensors.torch import load_file

    adapter = load_file(str(out["peft"] / "adapter_model.safetensors"))
    renamed = {k.removeprefix("base_model.model."): v for k, v in adapter.items()}
    out["peft_bare"] = save_safetensors(renamed, root / "bare" / "adapter_model.safetensors")
    (root / "bare" / "adapter_config.json").write_text(
        (out["peft"] / "adapter_config.json").read_text()
    )
    return out


def test_v2_chat_runs_strict_and_as_upstream_loads_it(files):
    _code, strict = smoke("--full", files["chat_ckpt"])
    assert strict["load"]["family"] == "llama-adapter-v2-chat"
    assert strict["load"]["gate_fn"] == "tanh"  # v2 always applies tanh
    _, upstream = smoke("--full", files["chat_ckpt"], "--load-as", "upstream")
    assert (
        upstream["load"]["matched"]
        == strict["load"]["matched"]
        == len(ff.v2_chat(CFG, prompt=True))
    )
    assert generated(upstream) == generated(strict)
    _, alone = smoke()
    assert generated(alone) != generated(strict)  # the bias/scale/norm tuning does something


def test_v2_chat_refuses_raw_gates(files):
    code, doc = smoke("--full", files["chat_ckpt"], "--gate", "raw")
    assert code == 2 and "tanh" in doc["error"]["message"]


def test_a_flat_v2_chat_file_is_diagnosed_and_cured(tmp_path, files):
    """Upstream's loader raises on a flat file; diagnose names LOAD_FAILS and extract's fix
    writes the {'model': ...} layout, which loads as upstream does, to the same tokens."""
    code, doc = smoke("--adapter", files["chat_flat"], "--load-as", "upstream")
    assert code == 2 and doc["error"]["id"] == "LOAD_FAILS"
    prompts = [x for p in PROMPTS for x in ("--prompt", p)]
    code, doc = run("diagnose", files["chat_flat"], "--base", BASE, *prompts, "--max-new-tokens", 8)
    assert doc["root_cause"] == "LOAD_FAILS" and code == 1
    assert doc["fix"].startswith("ckpt-doctor extract") and doc["fix"].endswith("adapter.pth")
    fixed = tmp_path / "adapter.pth"
    assert run("extract", files["chat_flat"], "--base", BASE, "-o", fixed)[0] == 0
    _, cured = smoke("--adapter", fixed, "--load-as", "upstream")
    _, strict = smoke("--adapter", files["chat_flat"])
    assert generated(cured) == generated(strict)
    code, doc = run("verify", fixed, "--base", BASE, "--full", files["chat_ckpt"])
    assert code == 0 and doc["passed"], doc["checks"]
    assert all(c["passed"] for c in doc["checks"])


def test_peft_runs_on_a_meta_and_an_hf_base_and_converts_exactly(tmp_path, files):
    _, meta = smoke("--adapter", files["peft"])
    assert meta["load"]["family"] == "peft-adaption-prompt" and meta["load"]["gate_fn"] == "raw"
    assert meta["load"]["matched"] == 4
    code, hf = run(
        "smoke-generate", "--base", files["hf"], "--adapter", files["peft"],
        *[x for p in PROMPTS for x in ("--prompt", p)], "--max-new-tokens", 10,
    )  # fmt: skip
    assert generated(hf) == generated(meta)  # an HF base is the same model
    v1 = tmp_path / "v1.safetensors"
    code, doc = run("convert", files["peft"], "--to", "llama-adapter-v1", "-o", v1, "--base", BASE)
    assert code == 0 and doc["max_logit_diff"] == 0.0
    _, converted = smoke("--adapter", v1)
    assert generated(converted) == generated(meta)
    back = tmp_path / "peft-again"
    code, doc = run("convert", v1, "--to", "peft-adaption-prompt", "-o", back, "--base", BASE)
    assert code == 0 and doc["max_logit_diff"] == 0.0
    from safetensors.torch import load_file

    a = load_file(str(files["peft"] / "adapter_model.safetensors"))
    b = load_file(str(back / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # round trip
    code, doc = smoke("--adapter", files["peft"], "--gate", "tanh")
    assert code == 2  # PEFT trains and runs its gates raw


def test_peft_verify_against_its_trainer_checkpoint(files):
    code, doc = run("verify", files["peft"], "--base", files["hf"], "--full", files["peft_full"])
    assert code == 0 and doc["passed"], doc["checks"]
    assert {c["name"] for c in doc["checks"]} >= {"bit-exact", "complete", "same logits"}


def test_peft_names_its_loader_cannot_match_are_the_seed_bug(tmp_path, files):
    bare = files["peft_bare"].parent
    _, doc = run("inspect", bare)
    assert doc["adapter"]["family"] == "peft-adaption-prompt"
    assert "LOAD_NOTHING" in {f["id"] for f in doc["findings"]}
    prompts = [x for p in PROMPTS for x in ("--prompt", p)]
    _, doc = run("diagnose", bare, "--base", BASE, *prompts, "--max-new-tokens", 8)
    assert doc["root_cause"] == "LOAD_NOTHING"
    assert doc["fix"].endswith("-o adapter")  # a PEFT adapter is a directory
    out = tmp_path / "adapter"
    assert run("extract", bare, "-o", out)[0] == 0
    _code, doc = run("inspect", out)
    assert not {"LOAD_NOTHING", "KEY_PREFIX"} & {f["id"] for f in doc["findings"]}


@pytest.mark.parametrize("command", ["smoke", "diagnose"])
def test_multimodal_is_refused_with_the_reason(files, command):
    if command == "smoke":
        code, doc = smoke("--adapter", files["mm"])
    else:
        code, doc = run("diagnose", files["mm"], "--base", BASE)
    assert code == 2 and "CLIP" in doc["error"]["message"]


def test_fsdp_wrapped_world_checkpoint_loads_its_adapter(tmp_path):
    """The world's training checkpoint as FSDP + activation checkpointing name it: a strict
    smoke run finds every adapter key (not 0) and generates what the clean file does."""

    from tests.test_families import _fsdp

    ckpt = load_training_checkpoint(ff.WORLD / "checkpoint-4.pth")
    ckpt["model"] = {_fsdp(k): v for k, v in ckpt["model"].items()}
    wrapped = save_zip(ckpt, tmp_path / "fsdp.pth")
    _, clean = smoke("--full", ff.WORLD / "checkpoint-4.pth")
    _, doc = smoke("--full", wrapped)
    assert doc["load"]["matched"] == clean["load"]["matched"] == 44
    assert generated(doc) == generated(clean)


@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"num_key_value_heads": 2}, "grouped-query"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "scaled RoPE"),
        ({"attention_bias": True}, "biases"),
    ],
)
def test_a_base_of_another_architecture_is_refused(tmp_path, files, config, said):
    """Never run another architecture as LLaMA: grouped-query attention, scaled RoPE, biased
    projections are refused with the reason."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((files["hf"] / "model.safetensors").read_bytes())
    (hf / "config.json").write_text(json.dumps({**hf_config(CFG), **config}))
    (hf / "tokenizer.model").write_bytes((ff.WORLD / "tokenizer.model").read_bytes())
    code, doc = run("smoke-generate", "--base", hf, "--prompt", "hi", "--max-new-tokens", 2)
    assert code == 2 and said in doc["error"]["message"]


def test_a_single_meta_file_as_the_base(files):
    """smoke-generate --base consolidated.00.pth reads params.json beside it: the same model,
    the same tokens as the directory."""
    _, whole = smoke("--full", ff.WORLD / "checkpoint-4.pth")
    prompts = [x for p in PROMPTS for x in ("--prompt", p)]
    single = BASE / "consolidated.00.pth"
    _, doc = run(
        "smoke-generate", "--base", single, "--full", ff.WORLD / "checkpoint-4.pth",
        "--tokenizer", ff.WORLD / "tokenizer.model", *prompts, "--max-new-tokens", 10,
    )  # fmt: skip
    assert generated(doc) == generated(whole)
