"""What people and scripts read: user text never read as markup, strict JSON, one-line errors,
whole tensor names, refused destinations, help texts."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_doctor import cli, render, render_runs
from ckpt_doctor.atomic import check_destination, write_atomically
from ckpt_doctor.cli import app
from ckpt_doctor.diagnosis import Diagnosis
from ckpt_doctor.errors import UsageError
from fixtures.make_fixtures import TinyConfig, adapter_tensors, base_state_dict, save_zip

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "fixtures" / "tiny"
WORLD = ROOT / "fixtures" / "world"
CFG = TinyConfig()
runner = CliRunner()


def run(*args: object, env: dict[str, str] | None = None):
    # 80 columns, as rich assumes when stdout / stderr is not a terminal (a pipe, a test).
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "80", **(env or {})})


def strict_json(text: str) -> dict:
    """json.loads that refuses NaN / Infinity: what a strict consumer (jq, JS) accepts."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def squeezed(text: str) -> str:
    """The text without any whitespace: what survives rich's line wrapping."""
    return "".join(text.split())


def adapter_file(path: Path, **changes: float) -> Path:
    """An extracted-adapter file (adapter_query.weight, layers.{i}.attention.gate)."""
    sd = adapter_tensors(CFG)
    for name, value in changes.items():
        key = "adapter_query.weight" if name == "query" else f"layers.{name[-1]}.attention.gate"
        sd[key].view(-1)[0] = value
    return save_zip(sd, path)


# --------------------------------------------------------------------------- markup


@pytest.mark.parametrize("parts", [("x[", "y].pth"), ("br[v1]", "ad[red].pth"), ("[bold]a.pth",)])
def test_bracketed_paths_print_as_they_are(tmp_path, parts):
    path = adapter_file(tmp_path.joinpath(*parts))
    result = run("inspect", path)
    assert result.exit_code in (0, 1), result.output
    assert "internal error" not in result.stderr and "INTERNAL" not in result.stderr
    assert squeezed(str(path)) in squeezed(result.stdout)  # not eaten as a tag
    code, doc = result.exit_code, strict_json(run("inspect", path, "--json").stdout)
    assert doc["path"] == str(path) and code in (0, 1)


def test_bracketed_prompt_and_generated_text_print_as_they_are():
    prompt = "[INST] Repeat the word [bold]dog[/] twice. [/INST]"
    args = ("smoke-generate", "--base", WORLD / "base", "--full", WORLD / "checkpoint-4.pth")
    args += ("--prompt", prompt, "--max-new-tokens", "4")
    narrow = run(*args)
    assert narrow.exit_code in (0, 1), narrow.output  # no MarkupError at 80 columns
    wide = run(*args, env={"COLUMNS": "400"})
    assert wide.exit_code == narrow.exit_code
    assert prompt in wide.stdout


def test_internal_error_text_is_not_markup_and_gives_json(monkeypatch, tmp_path):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom [/y] [bold]not bold")

    monkeypatch.setattr(cli, "inspect_checkpoint", broken)
    path = adapter_file(tmp_path / "a.pth")
    result = run("inspect", path)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "[INTERNAL] RuntimeError: boom [/y] [bold]not bold" in result.stderr
    assert "--debug" in result.stderr

    result = run("inspect", path, "--json")
    assert result.exit_code == 2
    doc = strict_json(result.stdout)
    assert doc["error"]["id"] == "INTERNAL" and "boom [/y]" in doc["error"]["message"]
    finding = {"id": "INTERNAL", "severity": "error", **_no_id(doc["error"]), "evidence": {}}
    assert doc["findings"] == [finding]  # the shape of every other finding

    result = run("--debug", "inspect", path)
    assert result.exit_code == 2  # an error stays 2 under --debug; 1 means findings
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr


def _no_id(error: dict) -> dict:
    return {k: v for k, v in error.items() if k != "id"}


# --------------------------------------------------------------------------- JSON


def test_nonfinite_values_are_null_in_strict_json(tmp_path):
    nan = adapter_file(tmp_path / "nan.pth", gate2=math.nan, gate3=math.inf, query=math.nan)
    result = run("inspect", nan, "--json")
    assert result.exit_code == 1, result.output
    doc = strict_json(result.stdout)
    gates = {g["layer"]: g for g in doc["gates"]}
    assert gates[2]["g"][0] is None and gates[2]["tanh_g"][0] is None  # NaN
    assert gates[3]["g"][0] is None and gates[3]["tanh_g"][0] == 1.0  # Inf; tanh(Inf) = 1
    assert all(isinstance(v, float) for v in gates[2]["g"][1:])
    findings = {f["id"]: f for f in doc["findings"]}
    assert findings["NONFINITE"]["evidence"]["count"] == 3
    assert findings["GATE_TANH_MISMATCH"]["evidence"]["ratio"] is None  # Inf / tanh(Inf)


def test_diff_numbers_are_numbers_or_null(tmp_path):
    clean = adapter_file(tmp_path / "clean.pth")
    nan = adapter_file(tmp_path / "nan.pth", query=math.nan)
    result = run("diff", nan, "--base", clean, "--json")
    assert result.exit_code == 1, result.output
    rows = {t["name"]: t for t in strict_json(result.stdout)["tensors"]}
    query = rows["adapter_query.weight"]
    assert query["status"] == "modified"
    assert query["max_abs"] is None and query["rel_l2"] is None and query["n_diff"] == 1
    for t in rows.values():
        assert t["max_abs"] is None or isinstance(t["max_abs"], float)
        assert t["rel_l2"] is None or isinstance(t["rel_l2"], float)


def test_json_safe_is_recursive_and_leaves_finite_values():
    doc = {"a": [1.5, math.nan, (math.inf, -math.inf)], "b": {"c": 0.0, "d": "nan"}, "e": 3}
    assert render.json_safe(doc) == {
        "a": [1.5, None, [None, None]],
        "b": {"c": 0.0, "d": "nan"},
        "e": 3,
    }


def test_usage_error_from_click_gives_json():
    """Through the console script's main() (click's own parsing errors are caught there)."""
    cmd = [sys.executable, "-m", "ckpt_doctor", "diff", str(BUNDLE / "checkpoint-4.pth")]
    result = subprocess.run([*cmd, "--json"], capture_output=True, text=True)  # no --base
    assert result.returncode == 2
    doc = strict_json(result.stdout)
    assert doc["error"]["id"] == "USAGE" and "--base" in doc["error"]["message"]
    assert "--base" in result.stderr
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stdout == "" and "--base" in plain.stderr


# --------------------------------------------------------------------------- layout


def test_error_line_is_one_line_however_long(tmp_path):
    bad = tmp_path / ("a-long-directory-name-" * 4) / "bad.pth"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 64)
    result = run("inspect", bad)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error [UNREADABLE]") and str(bad) in line and "hint: " in line


def test_fix_command_is_never_wrapped(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    fix = "ckpt-doctor extract " + "/very/long/path/to/" * 5 + "checkpoint-4.pth -o adapter.pth"
    d = Diagnosis(Path("x"), "LOAD_NOTHING", "upstream loads none of it", fix, findings=[])
    render_runs.render_diagnosis(d)
    assert f"fix: {fix}\n" in capsys.readouterr().out


def test_every_outcome_has_a_style_and_a_column_in_the_arms_table(capsys, monkeypatch):
    """A NaN run (outcome nonfinite) was dropped from diagnose's arms table."""
    from ckpt_doctor.diagnosis import Arm
    from ckpt_doctor.generate import OUTCOMES

    assert set(render_runs.OUTCOME_STYLE) == set(OUTCOMES)
    monkeypatch.setenv("COLUMNS", "200")
    arm = Arm("extracted adapter on the base", outcomes={"eos": 1, "nonfinite": 3})
    render_runs.render_diagnosis(Diagnosis(Path("x"), "NONFINITE", "NaN", None, [], [arm]))
    header, row = [line for line in capsys.readouterr().out.splitlines() if "┃" in line or
                   "│ extracted" in line][:2]  # fmt: skip
    cells = [c.strip() for c in row.split("│")[1:-1]]
    columns = [c.strip() for c in header.split("┃")[1:-1]]
    assert "nonfinite" in columns and cells[columns.index("nonfinite")] == "3"
    assert cells[columns.index("eos")] == "1"


def test_diff_table_shows_whole_tensor_names(tmp_path):
    base = base_state_dict(CFG)
    drifted = {k: v + 1 if k.endswith("feed_forward.w1.weight") else v for k, v in base.items()}
    result = run(
        "diff", save_zip(drifted, tmp_path / "d.pth"), "--base", save_zip(base, tmp_path / "b.pth")
    )
    assert result.exit_code == 1, result.output
    for i in range(CFG.n_layers):
        name = f"layers.{i}.feed_forward.w1.weight"
        assert f"│ {name} " in result.stdout  # on one line, in its cell
    assert "…" not in result.stdout


def test_argument_help_is_shown():
    result = run("inspect", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    # Fails on click 8.5+, which drops typer 0.20's argument help: pyproject pins click<8.5.
    assert "Checkpoint file or directory (Meta, HF)." in result.stdout, (
        f"no argument help with click {version('click')} and typer {version('typer')}"
    )


# --------------------------------------------------------------------------- destinations


def test_extract_refuses_a_directory_even_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = BUNDLE / "checkpoint-4.pth"
    result = run("extract", ckpt, "-o", out, "--force")
    assert result.exit_code == 2 and result.stdout == ""
    assert "[USAGE]" in result.stderr and "is a directory" in result.stderr
    assert "hint:" in result.stderr and "INTERNAL" not in result.stderr
    doc = strict_json(run("extract", ckpt, "-o", out, "--force", "--json").stdout)
    assert doc["error"]["id"] == "USAGE"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        out = tmp_path / "f.bin"
        check_destination(out, force=False, sources=[])
        write_atomically(out, lambda tmp: tmp.write_bytes(b"x"))
        assert os.umask(umask) == umask  # still what the caller set
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_extract_output_is_readable_like_any_new_file(tmp_path):
    before = os.umask(0o022)
    try:
        out = tmp_path / "adapter.safetensors"
        result = run("extract", BUNDLE / "checkpoint-4.pth", "-o", out)
    finally:
        os.umask(before)
    assert result.exit_code in (0, 1), result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_check_destination_refuses_a_directory(tmp_path):
    with pytest.raises(UsageError, match="is a directory") as info:
        check_destination(tmp_path, force=True, sources=[])
    assert info.value.hint


# --------------------------------------------------------------------------- messages


def test_demo_without_prompts_is_a_usage_error():
    result = run("demo", "--world", BUNDLE)
    assert result.exit_code == 2
    assert "[USAGE]" in result.stderr and "prompts.json" in result.stderr
    assert "hint:" in result.stderr and "INTERNAL" not in result.stderr


def test_extract_says_larger_when_the_output_is_larger(tmp_path):
    # A flat adapter re-saved gains the zip's per-file overhead: the output is the larger.
    src = adapter_file(tmp_path / "adapter.pth")
    out = tmp_path / "out.pth"
    result = run("extract", src, "-o", out)
    assert result.exit_code in (0, 1), result.output
    grew = out.stat().st_size - src.stat().st_size
    text = " ".join(result.stdout.split())
    word = "larger" if grew > 0 else "smaller"
    assert re.search(rf"; \d[\d.]* K?i?B {word} than the input\)", text), text


def test_empty_safetensors_hint_names_the_safetensors_saver(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    doc = strict_json(run("inspect", path, "--json").stdout)
    (empty,) = [f for f in doc["findings"] if f["id"] == "EMPTY"]
    assert "save_file" in empty["hint"] and "torch.save" not in empty["hint"]


def test_nonfinite_names_each_tensor_once(tmp_path):
    path = adapter_file(tmp_path / "nan.pth", query=math.nan)
    doc = strict_json(run("inspect", path, "--json").stdout)
    (f,) = [f for f in doc["findings"] if f["id"] == "NONFINITE"]
    assert f["message"].count("adapter_query.weight") == 1


def test_infinite_gate_ratio_is_said_in_words(tmp_path):
    path = adapter_file(tmp_path / "inf.pth", gate3=math.inf)
    doc = strict_json(run("inspect", path, "--json").stdout)
    (f,) = [f for f in doc["findings"] if f["id"] == "GATE_TANH_MISMATCH"]
    assert "infx" not in f["message"] and "an infinite multiple of" in f["message"]
