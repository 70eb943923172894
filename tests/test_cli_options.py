"""Options a newcomer finds in --help: choices with their values (and the aliases people type),
whole help texts at 80 columns, --debug / --quiet after the command, inspect --tensors, and
verify saying which checks it could not run."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from ckpt_doctor.reader import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "fixtures" / "tiny"
WORLD = ROOT / "fixtures" / "world"
runner = CliRunner()
COMMANDS = ("inspect", "diff", "extract", "verify", "repair", "diagnose", "smoke-generate", "demo")


def run(*args: object, columns: int = 80):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


def squeezed(text: str) -> str:
    """Without whitespace and the help panels' borders: what survives rich's wrapping."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


# --------------------------------------------------------------------------- --help


@pytest.mark.parametrize(
    ("command", "option", "values"),
    [
        ("smoke-generate", "--dtype", "[auto|float32|float16|bfloat16]"),
        ("smoke-generate", "--device", "[auto|cpu|cuda]"),
        ("smoke-generate", "--gate", "[raw|tanh]"),
        ("smoke-generate", "--load-as", "[strict|upstream]"),
        ("smoke-generate", "--attention", "[auto|reference|fused]"),
        ("smoke-generate", "--template", "[alpaca|none]"),
        ("diagnose", "--gate", "[raw|tanh]"),
        ("diagnose", "--template", "[alpaca|none]"),
        ("diagnose", "--attention", "[auto|reference|fused]"),
        ("diagnose", "--dtype", "[auto|float32|float16|bfloat16]"),
        ("extract", "--format", "[pth|safetensors]"),
        ("extract", "--dtype", "[float32|float16|bfloat16]"),
        ("repair", "--format", "[pth|safetensors]"),
    ],
)
def test_choices_are_listed_in_help(command, option, values):
    result = run(command, "--help", columns=200)
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if f" {option} " in line)
    assert values in line


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_text_is_cut_at_80_columns(command):
    """Every option's name and help text, word for word, in an 80-column --help (wrapped, not
    cut), and no markup escapes (a backslash before "[default: ...]")."""
    from typer.main import get_command

    click_command = get_command(app).commands[command]
    shown = run(command, "--help").stdout
    assert "…" not in shown and "..." not in shown.split("\n", 1)[1] and "\\[" not in shown
    assert max(map(len, shown.splitlines())) <= 80
    text = squeezed(shown)
    for param in click_command.params:
        if isinstance(param, click.Option):
            assert all(squeezed(name) in text for name in param.opts)
        help_text = getattr(param, "help", None)
        if help_text:
            assert squeezed(help_text) in text, (command, param.name)


def test_the_command_list_is_not_cut_at_80_columns():
    from typer.main import get_command

    shown = run("--help").stdout
    assert "…" not in shown and "..." not in shown.split("\n", 1)[1]
    for name, command in get_command(app).commands.items():
        assert squeezed(f"{name}{command.short_help}") in squeezed(shown)


@pytest.mark.parametrize("alias", ["bf16", "BF16", "bfloat16"])
def test_extract_dtype_takes_bf16(tmp_path, alias):
    out = tmp_path / "adapter.safetensors"
    result = run("extract", TINY / "checkpoint-4.pth", "-o", out, "--dtype", alias, "--json")
    assert result.exit_code == 0, result.output
    with open_checkpoint(out) as adapter:
        assert {h.dtype.name for h in adapter.tensors.values()} == {"bfloat16"}
        assert adapter.metadata["cast_dtype"] == "bfloat16"


@pytest.mark.parametrize(("alias", "dtype"), [("fp32", "float32"), ("half", "float16")])
def test_smoke_dtype_aliases(alias, dtype):
    args = ["smoke-generate", "--base", WORLD / "base", "--prompt", "hi"]
    result = run(*args, "--max-new-tokens", "2", "--dtype", alias, "--device", "cpu", "--json")
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["load"]["dtype"] == dtype


def test_a_value_outside_the_choices_is_a_usage_error_naming_them():
    result = run("smoke-generate", "--base", WORLD / "base", "--gate", "sigmoid")
    assert result.exit_code == 2
    assert "'sigmoid' is not one of 'raw', 'tanh'" in " ".join(result.stderr.split())


def test_json_usage_hint_names_the_command():
    cmd = [sys.executable, "-m", "ckpt_doctor", "extract", str(TINY / "checkpoint-4.pth")]
    result = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    hint = json.loads(result.stdout)["error"]["hint"]
    assert hint.endswith(" extract --help") and "COMMAND" not in hint


# --------------------------------------------------------------------------- --debug, --quiet


def test_debug_after_the_command(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    for args in (["--debug", "inspect", bad], ["inspect", bad, "--debug"]):
        result = run(*args)
        assert result.exit_code == 2, result.output  # an error stays 2 under --debug
        assert "Traceback" in result.stderr
    assert "Traceback" not in run("inspect", bad).stderr


def test_quiet_prints_the_findings_and_the_verdict_only():
    args = ("inspect", TINY / "checkpoint-4.pth", "--base", TINY / "base")
    full, quiet = run(*args), run(*args, "--quiet")
    assert full.exit_code == quiet.exit_code == 1
    assert "Adapter gates" in full.stdout and "Adapter gates" not in quiet.stdout
    assert "state dict" not in quiet.stdout
    for finding in ("LOAD_NOTHING", "CONTAINER_NESTED", "OPTIMIZER_STATE"):
        assert finding in quiet.stdout
    assert run("inspect", TINY / "base", "-q").stdout.strip() == "no findings"


# --------------------------------------------------------------------------- inspect --tensors


def test_inspect_tensors_lists_every_tensor():
    code, doc = _json("inspect", TINY / "checkpoint-4.pth", "--tensors")
    assert code == 1
    with open_checkpoint(TINY / "checkpoint-4.pth") as ckpt:
        expected = {n: h for n, h in ckpt.tensors.items()}
    rows = doc["tensor_list"]
    assert [r["name"] for r in rows] == list(expected)  # file order
    for r in rows:
        h = expected[r["name"]]
        assert (tuple(r["shape"]), r["dtype"], r["bytes"]) == (h.shape, h.dtype.name, h.nbytes)
    assert sum(r["bytes"] for r in rows) == doc["bytes"]


@pytest.mark.parametrize("pattern", ["layers.0.*", "*.gate", "adapter_*", "nothing*"])
def test_inspect_tensors_glob(pattern):
    code, doc = _json("inspect", TINY / "checkpoint-4.pth", "--tensors", pattern)
    with open_checkpoint(TINY / "checkpoint-4.pth") as ckpt:
        expected = [n for n in ckpt.tensors if fnmatch.fnmatchcase(n, pattern)]
    assert [r["name"] for r in doc["tensor_list"]] == expected
    assert code == 1


def test_inspect_tensors_table_and_default():
    result = run("inspect", TINY / "checkpoint-4.pth", "--tensors", "*.gate", "--deep")
    assert result.exit_code == 1, result.output
    assert "Tensors (4 of 44)" in result.stdout
    for i in range(4):
        assert f"layers.{i}.attention.gate" in result.stdout
    assert "[1, 4, 1, 1]" in result.stdout and "16 B" in result.stdout
    _, plain = _json("inspect", TINY / "checkpoint-4.pth")
    assert plain["tensor_list"] is None  # not asked for


def _json(*args: object) -> tuple[int, dict]:
    result = run(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


# --------------------------------------------------------------------------- verify --full


def test_verify_without_full_says_what_it_could_not_run(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    assert run("extract", TINY / "checkpoint-4.pth", "-o", adapter).exit_code == 0
    code, doc = _json("verify", adapter, "--base", TINY / "base")
    assert code == 0  # every check that ran passed; no finding
    assert doc["verdict"] == "partially verified: 3 checks need --full"
    assert doc["not_run"] == ["bit-exact", "complete", "same logits"]
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert status == {
        "reload": "pass",
        "upstream load": "pass",
        "values": "pass",
        "bit-exact": "not run",
        "complete": "not run",
        "strict load": "pass",
        "same logits": "not run",
    }
    result = run("verify", adapter, "--base", TINY / "base")
    assert "partially verified: 3 checks need --full" in result.stdout
    assert "verified\n" not in result.stdout.replace("partially verified", "")
    assert result.stdout.count("skip") == 3 and "needs --full" in result.stdout

    code, doc = _json(
        "verify", adapter, "--base", TINY / "base", "--full", TINY / "checkpoint-4.pth"
    )
    assert code == 0 and doc["verdict"] == "verified" and doc["not_run"] == []


def test_verify_check_names_stay_in_their_column(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    run("extract", TINY / "checkpoint-4.pth", "-o", adapter)
    result = run("verify", adapter, "--base", TINY / "base", "--full", TINY / "checkpoint-4.pth")
    lines = [line for line in result.stdout.splitlines() if line[:4] in ("pass", "FAIL", "skip")]
    assert len(lines) == 7
    starts = {line.index(line.split("  ")[-1].split()[0], 6) for line in lines[:1]}
    detail_column = next(iter(starts))
    for line in lines:  # every detail starts in the same column, after the whole name
        name = line[6:detail_column].rstrip()
        assert name in ("reload", "upstream load", "values", "bit-exact", "complete",
                        "strict load", "same logits")  # fmt: skip
        assert line[detail_column - 1] == " " and line[detail_column] != " "


def test_piped_output_has_no_trailing_spaces():
    result = run("inspect", TINY / "checkpoint-4.pth", "--base", TINY / "base")
    assert result.exit_code == 1
    assert [line for line in result.stdout.splitlines() if line != line.rstrip()] == []


def test_gate_table_column_is_named_as_in_json():
    result = run("inspect", TINY / "checkpoint-4.pth", columns=200)
    header = next(line for line in result.stdout.splitlines() if "layer" in line and "┃" in line)
    assert "prompt_index" in header
    doc = json.loads(run("inspect", TINY / "checkpoint-4.pth", "--json").stdout)
    assert "prompt_index" in doc["gates"][0]


def test_torch_stays_unloaded_for_inspect_help():
    code = "import sys, ckpt_doctor.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert torch.__version__  # the test suite itself has torch


def test_wrapped_lines_keep_their_indent(tmp_path):
    out = tmp_path / ("a-rather-long-directory-name-" * 2) / "adapter.safetensors"
    out.parent.mkdir()
    result = run("extract", WORLD / "checkpoint-4.pth", "--base", WORLD / "base", "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("extracted "))
    value_column = len("extracted ")
    continued = lines[first + 1]
    assert continued[:value_column].strip() == "" and continued[value_column] != " "
    assert max(map(len, lines)) <= 80


@pytest.mark.parametrize(
    ("args", "header"),
    [
        (["--full", WORLD / "checkpoint-4.pth"], "text"),  # every prompt ends in eos
        (["--full", WORLD / "checkpoint-4.pth", "--load-as", "upstream"], "text (» loop)"),
    ],
)
def test_the_loop_column_title_says_only_what_is_shown(args, header):
    result = run(
        "smoke-generate", "--base", WORLD / "base", *args, "--prompt", "Name the opposite of up.",
        "--max-new-tokens", "40", columns=120,
    )  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    titles = next(line for line in result.stdout.splitlines() if "┃ prompt" in line)
    assert titles.split("┃")[-2].strip() == header
    assert ("»" in result.stdout) == (header != "text")


def test_on_a_terminal_the_loop_is_underlined(monkeypatch, capsys):
    """A forced terminal: the repeating part is underlined (no » marker) and the title says so."""
    from rich.console import Console

    from ckpt_doctor import render_runs as render
    from ckpt_doctor.generate import Result
    from ckpt_doctor.loops import Loop

    term = Console(force_terminal=True, width=100, highlight=False, emoji=False)
    monkeypatch.setattr(render, "out", term)
    looped = Result("p", [1], generated_ids=[5] * 40, outcome="loop", text="dog " * 40)
    looped.loop, looped.loop_char = Loop(1, 0, 40.0), 0
    assert render._text_header([looped]) == "text (repeating part underlined)"
    marked = render._marked_text(looped)
    assert "»" not in marked.plain and any("underline" in str(s.style) for s in marked.spans)
    done = Result("p", [1], generated_ids=[5], outcome="eos", text="dog.")
    assert render._text_header([done]) == "text"
