"""Progress on stderr for the slow steps, when a person watches a terminal: loading (bytes),
generation (prompts, tokens), each diagnose arm, verify's logits check. None in pipes, under
--json without a terminal, or with --quiet; stdout (and its JSON) never carries any."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_doctor.progress import as_bytes, prefixed

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "fixtures" / "world"
TINY = ROOT / "fixtures" / "tiny"
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
SMOKE = ["smoke-generate", "--base", str(WORLD / "base"), "--full", str(WORLD / "checkpoint-4.pth")]
SMOKE += ["--prompt", "Name the opposite of up.", "--max-new-tokens", "8", "--device", "cpu"]


def on_a_tty(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal and stdout on a pipe: (code, stdout,
    what the terminal showed, without colour codes)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckpt_doctor", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        shown += chunk
    stdout = proc.stdout.read().decode()
    code = proc.wait(timeout=120)
    os.close(master)
    return code, stdout, ANSI.sub("", shown.decode(errors="replace"))


def test_smoke_generate_shows_loading_and_generation_on_a_terminal():
    code, stdout, shown = on_a_tty(*SMOKE, "--json")
    assert (
        code in (0, 1) and json.loads(stdout)["results"]
    )  # stdout holds the document alone  # --json: stdout holds the document alone
    assert "loading weights" in shown and "KiB" in shown
    assert "generating 1 prompt" in shown and "tokens" in shown


def test_quiet_turns_progress_off():
    _, stdout, shown = on_a_tty(*SMOKE, "--json", "--quiet")
    json.loads(stdout)
    assert "loading weights" not in shown and "generating" not in shown


def test_no_progress_without_a_terminal():
    result = subprocess.run(
        [sys.executable, "-m", "ckpt_doctor", *SMOKE, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    json.loads(result.stdout)
    assert result.stderr == ""


def test_diagnose_shows_each_arm():
    args = ["diagnose", str(WORLD / "checkpoint-4.pth"), "--base", str(WORLD / "base")]
    code, stdout, shown = on_a_tty(*args, "--prompt", "hi", "--max-new-tokens", "4")
    assert code == 1 and "root cause: LOAD_NOTHING" in stdout
    assert "checking against the base" in shown
    for k, arm in enumerate(
        ("as upstream loads it", "extracted adapter on the base", "base alone")
    ):
        assert f"arm {k + 1}/3 ({arm}): loading weights" in shown
        assert f"arm {k + 1}/3 ({arm}): generating 1 prompt" in shown


def test_verify_shows_the_logits_check(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    subprocess.run(
        [sys.executable, "-m", "ckpt_doctor", "extract", str(TINY / "checkpoint-4.pth"), "-o",
         str(adapter)],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    args = ["verify", str(adapter), "--base", str(TINY / "base")]
    code, stdout, shown = on_a_tty(*args, "--full", str(TINY / "checkpoint-4.pth"))
    assert code == 0 and "verified" in stdout
    assert "strict load: loading weights" in shown
    assert "same logits: --full: loading weights" in shown
    assert "same logits: forward passes" in shown


def test_progress_callbacks_compose():
    seen = []

    def sink(task, done, total, unit):
        seen.append((task, done, total, unit))

    prefixed(sink, "arm 1/3: ")("loading weights", 5, 10, "bytes")
    as_bytes(sink, "diff")(3, 9, "layers.0.attention.wq.weight")
    as_bytes(sink, "diff")(9, 9, "")
    assert seen == [
        ("arm 1/3: loading weights", 5, 10, "bytes"),
        ("diff layers.0.attention.wq.weight", 3, 9, "bytes"),
        ("diff", 9, 9, "bytes"),
    ]
    assert prefixed(None, "x") is None and as_bytes(None, "x") is None


@pytest.mark.parametrize("unit", ["bytes", "tokens"])
def test_the_progress_view_draws_each_task(monkeypatch, unit):
    """render's view on a forced terminal: every task name shows up, however fast."""
    import io

    from rich.console import Console

    from ckpt_doctor import render

    buf = io.StringIO()
    monkeypatch.setattr(
        render, "err", Console(file=buf, force_terminal=True, width=100, highlight=False)
    )
    with render.progress_view(enabled=True) as progress:
        progress("loading weights", 512, 2048, unit)
        progress("generating 4 prompts (1 finished)", 10, 256, unit)
    shown = ANSI.sub("", buf.getvalue())
    assert "loading weights" in shown and "generating 4 prompts (1 finished)" in shown
    assert ("512 B / 2.0 KiB" in shown) if unit == "bytes" else ("512/2048 tokens" in shown)
    with render.progress_view(enabled=False) as progress:
        assert progress is None
