"""The fixture world reproduces the looping bug and its cure, through the CLI.

fixtures/world holds a tiny base trained on responses that never end with eos, and an upstream
training checkpoint of a LLaMA-Adapter trained on eos-terminated answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from ckpt_doctor.families import LLAMA_ADAPTER_V1
from ckpt_doctor.reader import open_checkpoint

WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"
BASE, CKPT = WORLD / "base", WORLD / "checkpoint-4.pth"
runner = CliRunner()


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    return json.loads((WORLD / "prompts.json").read_text())["held_out"]


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    """The adapter tensors alone, flat, with upstream names (what extraction produces)."""
    with open_checkpoint(CKPT) as ckpt:
        flat = {
            k: h.to_torch().clone()
            for k, h in ckpt.tensors.items()
            if LLAMA_ADAPTER_V1.is_trained(k)
        }
    path = tmp_path_factory.mktemp("world") / "adapter.pth"
    torch.save(flat, path)
    return path


def smoke(held_out: list[str], *args: str) -> tuple[int, dict]:
    prompts = [a for p in held_out for a in ("--prompt", p)]
    result = runner.invoke(app, ["smoke-generate", "--base", str(BASE), *args, *prompts, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def share(doc: dict, *outcomes: str) -> float:
    results = doc["results"]
    return sum(r["outcome"] in outcomes for r in results) / len(results)


def ids(doc: dict) -> dict[str, str]:
    return {f["id"]: f["severity"] for f in doc["findings"]}


def test_base_plus_adapter_ends_in_eos(held_out, adapter_file):
    code, doc = smoke(held_out, "--adapter", str(adapter_file))
    assert len(doc["results"]) == len(held_out) >= 20
    assert share(doc, "eos") >= 0.9
    assert "LOAD_NOTHING" not in ids(doc)
    assert doc["load"]["matched"] > 0
    assert all(r["prompt_ids"][0] == 1 for r in doc["results"])  # bos from the tokenizer
    answered = [r for r in doc["results"] if r["generated_ids"] and r["text"]]
    assert len(answered) >= 0.9 * len(held_out)
    assert code == (0 if share(doc, "eos") == 1 and not doc["findings"] else 1)


def test_base_alone_never_stops(held_out):
    code, doc = smoke(held_out)
    assert share(doc, "loop", "max_tokens") >= 0.9
    assert code == 1 and {"LOOP", "NO_EOS"} & set(ids(doc))


def test_upstream_load_of_training_checkpoint_is_the_seed_bug(held_out):
    code, doc = smoke(held_out, "--full", str(CKPT), "--load-as", "upstream")
    assert share(doc, "loop", "max_tokens") >= 0.9
    assert ids(doc)["LOAD_NOTHING"] == "error"
    assert doc["load"]["matched"] == 0 and code == 1
    _, base_doc = smoke(held_out)
    assert [r["generated_ids"] for r in doc["results"]] == [
        r["generated_ids"] for r in base_doc["results"]
    ]


def test_strict_load_of_training_checkpoint_behaves_like_base_plus_adapter(held_out, adapter_file):
    _, strict = smoke(held_out, "--full", str(CKPT), "--load-as", "strict")
    _, adapter = smoke(held_out, "--adapter", str(adapter_file))
    assert [r["generated_ids"] for r in strict["results"]] == [
        r["generated_ids"] for r in adapter["results"]
    ]
    assert share(strict, "eos") >= 0.9


def test_a_long_prompt_gets_its_whole_budget():
    """No hidden context cap: a prompt of ~300 tokens still gets max_new_tokens tokens. The
    world's base never emits eos, and without loop stops it runs to the limit: exactly 12."""
    from ckpt_doctor.generate import GenerationConfig
    from ckpt_doctor.smoke import smoke_generate

    prompt = " ".join(["word"] * 280)
    config = GenerationConfig(max_new_tokens=12, stop_on_loop=False)
    with open_checkpoint(BASE) as base:
        report = smoke_generate(base, prompts=[prompt], config=config, device="cpu")
    (r,) = report.results
    assert len(r.prompt_ids) > 280
    assert report.load.args.max_seq_len == len(r.prompt_ids) + 12  # sized from the prompt
    assert r.outcome == "max_tokens" and len(r.generated_ids) == 12


def test_a_gate_outside_the_choices_is_a_usage_error_in_json():
    """--gate is a choice: click refuses the value; main() still gives one JSON document."""
    cmd = [sys.executable, "-m", "ckpt_doctor", "smoke-generate", "--base", str(BASE)]
    result = subprocess.run([*cmd, "--gate", "bogus", "--json"], capture_output=True, text=True)
    assert result.returncode == 2
    doc = json.loads(result.stdout)
    assert doc["error"]["id"] == "USAGE" and "'bogus' is not one of" in doc["error"]["message"]
    assert doc["error"]["hint"].endswith(" smoke-generate --help")


@pytest.mark.parametrize(
    "args",
    [
        ["--max-new-tokens", "0"],
        ["--temperature", "nan"],
        ["--temperature", "-1"],
        ["--top-p", "0"],
        ["--top-p", "2"],
    ],
)
def test_bad_generation_options_are_usage_errors(args):
    result = runner.invoke(app, ["smoke-generate", "--base", str(BASE), *args, "--json"])
    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)
    assert doc["error"]["id"] == "USAGE" and doc["error"]["hint"]
    assert "internal error" not in result.stderr


@pytest.mark.parametrize("case", ["nan", "fp16_overflow"])
def test_nonfinite_logits_are_reported_not_run_to_the_limit(adapter_file, tmp_path, case):
    adapter = torch.load(adapter_file, weights_only=True)
    query = adapter["adapter_query.weight"]
    query[0, 0] = float("nan") if case == "nan" else 70000.0  # fp32: finite; fp16: Inf
    path = tmp_path / f"{case}.pth"
    torch.save(adapter, path)
    dtype = "float16" if case == "fp16_overflow" else "float32"
    args = ["--adapter", str(path), "--dtype", dtype, "--device", "cpu"]
    result = runner.invoke(
        app, ["smoke-generate", "--base", str(BASE), *args, "--prompt", "hi", "--json"]
    )
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    (r,) = doc["results"]
    assert r["outcome"] == "nonfinite" and r["nonfinite_at"] == 0 and r["generated_ids"] == []
    (f,) = doc["findings"]
    assert (f["id"], f["severity"]) == ("NONFINITE", "error")
    assert ("--dtype float32" in f["hint"]) == (case == "fp16_overflow")
    assert "inspect" in f["hint"]


TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"


@pytest.mark.parametrize("command", ["smoke-generate", "diagnose"])
def test_another_models_tokenizer_is_vocab_mismatch_not_internal(command):
    """The world's 256-token tokenizer on the tiny 128-row base: ids beyond the embedding."""
    args = ["--base", str(TINY / "base"), "--tokenizer", str(WORLD / "tokenizer.model")]
    args += ["--prompt", "hi", "--max-new-tokens", "4", "--json"]
    if command == "diagnose":
        args = [str(TINY / "checkpoint-4.pth"), *args]
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert error["id"] == "VOCAB_MISMATCH" and "--tokenizer" in error["hint"]
    assert "128" in error["message"]


def test_check_vocab_names_bos_and_eos_beyond_the_embedding(tmp_path):
    from types import SimpleNamespace

    from ckpt_doctor.errors import UsageError
    from ckpt_doctor.smoke import check_vocab

    tok = SimpleNamespace(bos_id=1, eos_id=300, vocab_size=301)
    with pytest.raises(UsageError) as info:
        check_vocab(tok, [[1, 5]], vocab_size=256, tokenizer_path=tmp_path / "t.model")
    assert info.value.code == "VOCAB_MISMATCH" and "eos id 300" in info.value.message
    check_vocab(tok, [[1, 5]], vocab_size=301, tokenizer_path=tmp_path / "t.model")
