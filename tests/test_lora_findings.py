"""Each LoRA finding, from the files as PEFT (or a broken save) writes them: the empty adapter
of the alpaca-lora save bug (EMPTY, with where the weights are), every B zero (ADAPTER_INERT),
adapter_config.json against the tensors (ADAPTER_CONFIG), names PEFT's loader does not match
(LOAD_NOTHING), shapes of another model (ADAPTER_SHAPE); and diagnose's arms on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from fixtures.families.lora_format import lora_adapter, lora_full
from fixtures.make_family_fixtures import meta_base, meta_to_hf
from fixtures.make_fixtures import save_safetensors, save_zip

FAMILIES = Path(__file__).resolve().parents[1] / "fixtures" / "families"
LORA = FAMILIES / "peft-lora"
BASE = FAMILIES / "hf-base"
runner = CliRunner()
SHORT = ["--prompt", "Name three colors.", "--prompt", "Tell me about alpacas.",
         "--max-new-tokens", "8"]  # fmt: skip


def run(*args: object) -> tuple[int, dict]:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    return result.exit_code, json.loads(result.stdout)


def found(doc: dict, id: str) -> dict:
    return next(f for f in doc["findings"] if f["id"] == id)


def adapter_dir(root: Path, tensors: dict | None = None, **config) -> Path:
    """A PEFT adapter dir: the fixture's tensors (or ``tensors``), its config updated."""
    out = root / "adapter"
    out.mkdir(parents=True)
    tensors = load_file(str(LORA / "adapter_model.safetensors")) if tensors is None else tensors
    save_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((LORA / "adapter_config.json").read_text()) | config
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def buggy_run(tmp_path) -> Path:
    """An output_dir as alpaca-lora's save leaves it: the right config, an empty
    adapter_model.bin, the weights in the Trainer's checkpoint-20/."""
    run_dir = tmp_path / "lora-alpaca"
    (run_dir / "checkpoint-20").mkdir(parents=True)
    shutil.copy(LORA / "adapter_config.json", run_dir)
    torch.save({}, run_dir / "adapter_model.bin")
    full = lora_full(meta_to_hf(meta_base()), lora_adapter())
    save_zip(full, run_dir / "checkpoint-20" / "pytorch_model.bin")
    return run_dir


def test_the_empty_adapter_says_why_and_where_the_weights_are(buggy_run):
    code, doc = run("inspect", buggy_run)
    assert code == 1 and doc["adapter"]["family"] == "peft-lora"
    empty = found(doc, "EMPTY")
    size = (buggy_run / "adapter_model.bin").stat().st_size
    assert empty["severity"] == "error" and empty["evidence"]["bytes"] == size
    assert f"{size} bytes" in empty["message"] and "nothing to load" in empty["message"]
    assert "runs as the base" in empty["message"] and "alpaca-lora" in empty["message"]
    weights = str(buggy_run / "checkpoint-20" / "pytorch_model.bin")
    assert empty["evidence"]["weights_at"] == [weights] and weights in empty["hint"]
    shutil.rmtree(buggy_run / "checkpoint-20")
    _, doc = run("inspect", buggy_run / "adapter_model.bin")
    empty = found(doc, "EMPTY")
    assert "checkpoint-N/pytorch_model.bin or model.safetensors" in empty["message"]


def test_diagnose_the_empty_adapter_the_fix_extracts_from_the_checkpoint(buggy_run):
    code, doc = run("diagnose", buggy_run, "--base", BASE, *SHORT)
    assert code == 1 and doc["root_cause"] == "EMPTY"
    weights = buggy_run / "checkpoint-20" / "pytorch_model.bin"
    assert doc["fix"] == f"ckpt-doctor extract {weights} --base {BASE} -o adapter"
    upstream, extracted, alone = doc["arms"]
    assert upstream["matched"] == 0 and "not run" in extracted["error"]
    assert [r["generated_ids"] for r in upstream["results"]] == [
        r["generated_ids"] for r in alone["results"]
    ]
    # The checkpoint itself: PEFT's loader takes its names (the live ones), as extraction does.
    code, doc = run("diagnose", weights, "--base", BASE, *SHORT)
    upstream, extracted, alone = doc["arms"]
    assert upstream["matched"] and extracted["matched"] == 56
    as_saved = [r["generated_ids"] for r in upstream["results"]]
    assert as_saved == [r["generated_ids"] for r in extracted["results"]]
    assert as_saved != [r["generated_ids"] for r in alone["results"]]
    assert doc["root_cause"] not in ("EMPTY", "LOAD_NOTHING", "ADAPTER_INERT")


def test_every_b_zero_is_inert(tmp_path):
    tensors = {
        k: torch.zeros_like(v) if ".lora_B." in k else v
        for k, v in load_file(str(LORA / "adapter_model.safetensors")).items()
    }
    code, doc = run("inspect", adapter_dir(tmp_path, tensors), "--base", BASE)
    inert = found(doc, "ADAPTER_INERT")
    assert code == 1 and inert["severity"] == "error" and "28 LoRA B" in inert["message"]
    code, doc = run("verify", tmp_path / "adapter", "--base", BASE)
    assert "ADAPTER_INERT" in {f["id"] for f in doc["findings"]} and not doc["passed"]


def test_a_config_of_another_rank(tmp_path):
    code, doc = run("inspect", adapter_dir(tmp_path, r=16), "--base", BASE)
    config = found(doc, "ADAPTER_CONFIG")
    assert code == 1 and "rank" in config["message"] and "raises" in config["message"]


def test_config_targets_and_tensors_disagree(tmp_path):
    tensors = {
        k: v
        for k, v in load_file(str(LORA / "adapter_model.safetensors")).items()
        if ".k_proj." not in k
    }
    _, doc = run("inspect", adapter_dir(tmp_path / "a", tensors), "--base", BASE)
    message = found(doc, "ADAPTER_CONFIG")["message"]
    assert "no tensors for 4 module(s) it targets" in message and "k_proj" in message
    _, doc = run("inspect", adapter_dir(tmp_path / "b", target_modules=["q_proj"]), "--base", BASE)
    assert "24 module(s) it does not target" in found(doc, "ADAPTER_CONFIG")["message"]


def test_no_config_means_no_alpha(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(LORA / "adapter_model.safetensors", bare)
    _, doc = run("inspect", bare, "--base", BASE)
    assert "lora_alpha" in found(doc, "ADAPTER_CONFIG")["message"]


def test_names_pefts_loader_does_not_match_load_nothing(tmp_path):
    """Saved without base_model.model. (PEFT's loader takes 0 keys: recorded with PEFT in
    fixtures/families/expected.json): predicted by inspect, seen by --load-as upstream."""
    tensors = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(str(LORA / "adapter_model.safetensors")).items()
    }
    adapter = adapter_dir(tmp_path, tensors)
    code, doc = run("inspect", adapter, "--base", BASE)
    nothing = found(doc, "LOAD_NOTHING")
    assert code == 1 and nothing["severity"] == "error" and "LoRA B" in nothing["message"]
    code, doc = run(
        "smoke-generate", "--base", BASE, "--adapter", adapter, "--load-as", "upstream", *SHORT
    )
    assert doc["load"]["matched"] == 0 and "LOAD_NOTHING" in {f["id"] for f in doc["findings"]}
    code, doc = run("smoke-generate", "--base", BASE, "--adapter", adapter, *SHORT)
    assert doc["load"]["matched"] == 56  # ckpt-doctor's strict load resolves the names


def test_a_lora_of_another_model_is_adapter_shape(tmp_path):
    tensors = {
        k: torch.zeros(v.shape[0], 32) if k.endswith("q_proj.lora_A.weight") else v
        for k, v in load_file(str(LORA / "adapter_model.safetensors")).items()
    }
    _, doc = run("inspect", adapter_dir(tmp_path, tensors), "--base", BASE)
    assert "q_proj" in found(doc, "ADAPTER_SHAPE")["message"]


def test_dora_is_named_and_refused(tmp_path):
    tensors = load_file(str(LORA / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(
        64
    )
    adapter = adapter_dir(tmp_path, tensors, use_dora=True)
    code, doc = run("inspect", adapter, "--base", BASE)
    assert doc["adapter"]["family"] == "peft-lora" and "DoRA" in doc["adapter"]["lora"]["refusal"]
    code, doc = run("smoke-generate", "--base", BASE, "--adapter", adapter, *SHORT)
    assert code == 2 and "DoRA" in doc["error"]["message"]


def test_a_clean_lora_has_no_findings_even_without_its_base():
    """PEFT's own adapter dir (no config.json: its head count is unknown, and the values are
    checked in their saved row order), and the world's Trainer checkpoint."""
    for path in (LORA, FAMILIES.parent / "world" / "lora" / "checkpoint-300"):
        code, doc = run("inspect", path)
        assert code == 0 and doc["findings"] == [], doc["findings"]
        assert doc["adapter"]["family"] == "peft-lora"
    code, doc = run("inspect", LORA, "--base", BASE)
    assert code == 0 and doc["adapter"]["lora"]["ranks"] == [4, 8]
