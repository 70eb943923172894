"""The command-line contract: exit codes, one JSON document on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from fixtures.make_fixtures import TinyConfig, base_state_dict, save_zip

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "fixtures" / "tiny"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args: str) -> tuple[int, dict]:
    result = run(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def test_inspect_training_checkpoint_against_base():
    """Must show 4: the upstream training checkpoint is nested, loads nothing, carries an
    optimizer, has its adapter config in args and trained per-head gates; exit 1. Loading
    nothing as upstream does is the one error (LOAD_NOTHING is an error wherever it is found)."""
    code, doc = run_json("inspect", BUNDLE / "checkpoint-4.pth", "--base", BUNDLE / "base")
    assert code == 1
    severity = {f["id"]: f["severity"] for f in doc["findings"]}
    assert severity == {
        "LOAD_NOTHING": "error",
        "CONTAINER_NESTED": "info",
        "OPTIMIZER_STATE": "info",
    }
    assert all(f["hint"] for f in doc["findings"])
    assert doc["container_path"] == ["model"]
    adapter = doc["adapter"]
    assert (adapter["adapter_len"], adapter["adapter_layer"], adapter["source"]) == (4, 2, "args")
    assert adapter["adapted_layers"] == [2, 3]
    assert [g["layer"] for g in doc["gates"]] == [2, 3]
    for gate in doc["gates"]:
        assert len(gate["g"]) == len(gate["tanh_g"]) == TinyConfig().n_heads
        for g, t in zip(gate["g"], gate["tanh_g"], strict=True):
            assert t == pytest.approx(float(torch.tanh(torch.tensor(g))), abs=1e-6)
    assert doc["model"]["dim"] == 64 and doc["model"]["n_heads"] == 4
    assert doc["diff_counts"]["identical"] == 39 and doc["diff_counts"]["added"] == 5


def test_inspect_human_output_names_the_problem():
    result = run("inspect", BUNDLE / "checkpoint-4.pth", "--base", BUNDLE / "base")
    assert result.exit_code == 1
    for text in ("LOAD_NOTHING", "CONTAINER_NESTED", "Adapter gates", "adapter_len 4"):
        assert text in result.stdout


def test_clean_base_exits_zero():
    code, doc = run_json("inspect", BUNDLE / "base")
    assert code == 0
    assert doc["findings"] == []
    assert doc["format"] == "meta-dir" and doc["adapter"] is None


def test_diff_json_lists_every_tensor():
    code, doc = run_json("diff", BUNDLE / "checkpoint-4.pth", "--base", BUNDLE / "base")
    assert code == 1  # differences found
    statuses = {t["name"]: t["status"] for t in doc["tensors"]}
    assert len(statuses) == 44
    added = {n for n, s in statuses.items() if s == "added"}
    assert added == {"adapter_query.weight"} | {f"layers.{i}.attention.gate" for i in range(4)}
    assert set(doc["adapter"]) == added
    assert all(t["max_abs"] == 0.0 for t in doc["tensors"] if t["status"] == "identical")


def test_diff_identical_exits_zero():
    code, doc = run_json("diff", BUNDLE / "base", "--base", BUNDLE / "base")
    assert code == 0 and doc["counts"]["identical"] == 44 - 5


def test_unreadable_is_exit_2_with_json_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    code, doc = run_json("inspect", bad)
    assert code == 2
    assert doc["findings"][0]["id"] == "UNREADABLE"
    result = run("inspect", bad)
    assert result.exit_code == 2 and "UNREADABLE" in result.stderr and result.stdout == ""


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_payload_executes_nothing_and_exits_2(tmp_path, legacy):
    """Must show 1: run as a real process; the payload must not run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": base_state_dict(TinyConfig()), "extra": Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt_doctor", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert not marker.exists()
    doc = json.loads(proc.stdout)
    system = f"{os.system.__module__}.{os.system.__name__}"
    assert doc["findings"][0]["id"] == "UNSAFE_PICKLE"
    assert system in doc["findings"][0]["message"]
    assert "--trust-pickle" in doc["findings"][0]["hint"]
    assert "UNSAFE_PICKLE" in proc.stderr and system in proc.stderr


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    result = run("--debug", "inspect", bad)
    # The traceback on stderr, and still the error's exit code: 1 would mean "findings".
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "UnreadableError" in result.stderr
    assert "error [UNREADABLE]" in result.stderr and result.stdout == ""


def test_version_and_help():
    assert run("--version").stdout.startswith("ckpt-doctor ")
    assert "inspect" in run("--help").stdout


def test_prefixed_file_reports_key_prefix(tmp_path):
    sd = base_state_dict(TinyConfig())
    path = save_zip({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    code, doc = run_json("inspect", path)
    ids = {f["id"] for f in doc["findings"]}
    assert code == 1 and {"KEY_PREFIX", "LOAD_NOTHING"} <= ids
    assert doc["prefix"] == "module."


def test_inspect_and_diff_never_import_torch():
    """Importing torch costs seconds: inspect and diff must stay I/O bound (Must show 1)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ckpt_doctor.cli import app\n"
        f"r = CliRunner().invoke(app, ['inspect', {str(BUNDLE / 'checkpoint-4.pth')!r},"
        f" '--base', {str(BUNDLE / 'base')!r}, '--json'])\n"
        "assert r.exit_code == 1, r.output\n"
        f"r = CliRunner().invoke(app, ['diff', {str(BUNDLE / 'checkpoint-4.pth')!r},"
        f" '--base', {str(BUNDLE / 'base')!r}, '--json'])\n"
        "assert r.exit_code == 1, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
