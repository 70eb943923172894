"""diagnose takes smoke-generate's generation options, shows every arm's text per prompt (the
loop marked) and gives token ids and text in JSON; LOAD_NOTHING has one severity and one
message in inspect, smoke-generate and diagnose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ckpt_doctor.kernels import triton_problem
from typer.testing import CliRunner

from ckpt_doctor.cli import app

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "fixtures" / "world"
TINY = ROOT / "fixtures" / "tiny"
PROMPTS = ["Name the opposite of up.", "Repeat the word dog twice."]
runner = CliRunner()


def diagnose(*extra: str, columns: int = 100):
    args = ["diagnose", str(WORLD / "checkpoint-4.pth"), "--base", str(WORLD / "base")]
    args += [a for p in PROMPTS for a in ("--prompt", p)]
    return runner.invoke(app, [*args, "--device", "cpu", *extra], env={"COLUMNS": str(columns)})


def diagnose_json(*extra: str) -> dict:
    result = diagnose(*extra, "--json")
    assert result.exit_code == 1, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def greedy() -> dict:
    return diagnose_json("--max-new-tokens", "40")


def arm(doc: dict, letter: str) -> dict:
    return doc["arms"]["ABC".index(letter)]


def test_json_has_every_arms_ids_and_text_per_prompt(greedy):
    for a in greedy["arms"]:
        assert [r["prompt"] for r in a["results"]] == PROMPTS
        for r in a["results"]:
            assert r["generated_ids"] and r["text"] and r["outcome"] in ("eos", "loop")
            assert len(r["eos_probs"]) >= len(r["generated_ids"])
        assert a["generated"] == [r["generated_ids"] for r in a["results"]]
    answers = [r["text"] for r in arm(greedy, "B")["results"]]
    assert answers == ["down.", "dog dog."]
    assert {r["outcome"] for r in arm(greedy, "A")["results"]} == {"loop"}
    assert arm(greedy, "A")["results"][0]["loop"]["period"] >= 1
    assert len(greedy["gates"]) == 3  # the adapted layers' gates, as inspect reads them


def test_the_table_shows_every_arms_text_with_the_loop_marked():
    result = diagnose("--max-new-tokens", "40")
    assert result.exit_code == 1
    out = result.stdout
    assert "Generations" in out and "text (» loop)" in out
    rows = [line for line in out.splitlines() if line.startswith("│") and "│ B   │" in line]
    assert any("down." in row for row in rows) and any("dog dog." in row for row in rows)
    looping = [line for line in out.splitlines() if "│ A   │ loop" in line]
    assert len(looping) == 2 and all("»" in line for line in looping)


def test_max_new_tokens_and_template_reach_every_arm(greedy):
    short = diagnose_json("--max-new-tokens", "3")
    for a in short["arms"]:
        assert all(len(r["generated_ids"]) <= 3 for r in a["results"])
    plain = diagnose_json("--max-new-tokens", "3", "--template", "none")
    for a, b in zip(plain["arms"], greedy["arms"], strict=True):
        for r, g in zip(a["results"], b["results"], strict=True):
            assert len(r["prompt_ids"]) < len(g["prompt_ids"])  # no Alpaca wrapper


def test_gate_function_reaches_the_adapter_arm(greedy):
    tanh = diagnose_json("--max-new-tokens", "40", "--gate", "tanh")
    raw_b, tanh_b = arm(greedy, "B")["results"], arm(tanh, "B")["results"]
    assert [r["eos_probs"] for r in raw_b] != [r["eos_probs"] for r in tanh_b]
    # arm C (the base alone) has no gate: the same either way
    assert arm(greedy, "C")["results"] == arm(tanh, "C")["results"]


def test_sampling_options_reach_the_arms():
    args = ("--max-new-tokens", "12", "--temperature", "1.5", "--top-p", "0.95")
    first = diagnose_json(*args, "--seed", "1")
    again = diagnose_json(*args, "--seed", "1", "--no-cuda-graph")
    other = diagnose_json(*args, "--seed", "2")
    ids = [[r["generated_ids"] for r in a["results"]] for a in first["arms"]]
    assert ids == [[r["generated_ids"] for r in a["results"]] for a in again["arms"]]
    assert ids != [[r["generated_ids"] for r in a["results"]] for a in other["arms"]]


def test_attention_reaches_the_arms():
    """The fused kernels (here in Triton's CPU interpreter, which the test suite turns on)
    give every arm the tokens the PyTorch reference gives."""
    if triton_problem() is not None:
        pytest.skip(triton_problem())
    args = ("--max-new-tokens", "3")
    fused, reference = diagnose_json(*args, "--attention", "fused"), diagnose_json(*args)
    for a, b in zip(fused["arms"], reference["arms"], strict=True):
        assert [r["generated_ids"] for r in a["results"]] == [
            r["generated_ids"] for r in b["results"]
        ]


# --------------------------------------------------------------------------- LOAD_NOTHING


def _load_nothing(doc: dict) -> dict:
    (f,) = [f for f in doc["findings"] if f["id"] == "LOAD_NOTHING"]
    return f


def test_load_nothing_is_one_error_with_one_message_everywhere(greedy):
    """inspect predicts it from the names, smoke-generate --load-as upstream sees it,
    diagnose has both: the same severity, message and hint."""
    inspected = json.loads(
        runner.invoke(app, ["inspect", str(WORLD / "checkpoint-4.pth"), "--json"]).stdout
    )
    args = [
        "smoke-generate",
        "--base",
        str(WORLD / "base"),
        "--full",
        str(WORLD / "checkpoint-4.pth"),
    ]
    args += ["--load-as", "upstream", "--prompt", "hi", "--max-new-tokens", "2", "--json"]
    smoked = json.loads(runner.invoke(app, args).stdout)
    found = [_load_nothing(d) for d in (inspected, smoked, greedy)]
    assert {f["severity"] for f in found} == {"error"}
    assert len({f["message"] for f in found}) == 1 and len({f["hint"] for f in found}) == 1
    assert "0 of the model's 44 keys" in found[0]["message"]


def test_load_nothing_for_a_prefixed_file_names_the_repair(tmp_path):
    import torch

    sd = torch.load(TINY / "checkpoint-4.pth", weights_only=False)["model"]
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    doc = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    f = _load_nothing(doc)
    assert f["severity"] == "error" and f["hint"].startswith("strip the prefix: ckpt-doctor repair")
