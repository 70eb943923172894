"""Writing commands never overwrite what they read, never leave a partial or temporary file,
and report a failing target (full disk, read-only, no permission, ulimit -f) as one IO line."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor import atomic, layouts
from ckpt_doctor.atomic import check_destination, sweep_temps, write_atomically
from ckpt_doctor.cli import app
from ckpt_doctor.errors import UsageError, WriteError

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "fixtures" / "world"
runner = CliRunner()
EXPECTED = {"adapter_query.weight", *(f"layers.{i}.attention.gate" for i in range(4))}


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A copy of the fixture world (base dir, tokenizer one level up, checkpoint)."""
    dst = tmp_path / "world"
    shutil.copytree(WORLD, dst, ignore=shutil.ignore_patterns("prompts.json", "manifest.json"))
    return dst


def _digests(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _usage(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [USAGE]"), result.stderr
    return lines[0]


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("command", ["extract", "repair"])
@pytest.mark.parametrize(
    "target",
    ["base/params.json", "base/consolidated.00.pth", "tokenizer.model", "checkpoint-4.pth"],
)
@pytest.mark.parametrize("force", [False, True])
def test_never_over_a_file_the_command_reads(world, command, target, force):
    before = _digests(world)
    args = [command, str(world / "checkpoint-4.pth"), "--base", str(world / "base")]
    args += ["-o", str(world / target), "--format", "pth", *(["--force"] if force else [])]
    _usage(args)
    assert _digests(world) == before


@pytest.mark.parametrize("name", ["consolidated.01.pth", "config.json", "tokenizer.json"])
def test_never_adds_a_file_the_base_directory_would_read(world, name):
    """No --force needed to break a base by adding a shard: refused all the same."""
    before = _digests(world)
    args = ["extract", str(world / "checkpoint-4.pth"), "--base", str(world / "base")]
    line = _usage([*args, "-o", str(world / "base" / name), "--format", "pth"])
    assert "reads a file of that name" in line or "tokenizer" in line
    assert _digests(world) == before


def test_hf_index_and_shards_are_protected(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("model.safetensors.index.json", "model-00001.safetensors", "config.json"):
        (hf / name).write_text("{}")
    for name in ("model.safetensors.index.json", "config.json", "model.safetensors"):
        with pytest.raises(UsageError):
            check_destination(hf / name, force=True, sources=[hf])


def test_links_to_an_input_are_the_input(world, tmp_path):
    ckpt = world / "checkpoint-4.pth"
    (tmp_path / "sym.pth").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.pth")
    for out in ("sym.pth", "hard.pth"):
        with pytest.raises(UsageError, match="one of the inputs"):
            check_destination(tmp_path / out, force=True, sources=[ckpt])


# --------------------------------------------------------------------------- temp files


@pytest.fixture(params=["anonymous", "named"])
def mode(request, tmp_path, monkeypatch) -> str:
    """Run a test with the O_TMPFILE path (where the filesystem allows) and the fallback."""
    if request.param == "named":
        monkeypatch.setitem(atomic._link_mode, str(tmp_path), "named")
    elif atomic._mode(tmp_path) == "named":
        pytest.skip("this filesystem cannot link an O_TMPFILE file")
    return request.param


def test_the_file_is_invisible_until_complete(tmp_path, mode):
    seen = []

    def write(target: Path) -> None:
        target.write_bytes(b"x" * 1000)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    write_atomically(tmp_path / "out.bin", write)
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 1000
    if mode == "anonymous":
        assert seen == [[]]  # no name at all while it was written
    else:
        assert len(seen[0]) == 1 and seen[0][0].startswith(".out.bin.ckpt-doctor-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_replace_keeps_the_old_file_until_the_new_one_is_complete(tmp_path, mode):
    (tmp_path / "out.bin").write_bytes(b"old")

    def write(target: Path) -> None:
        target.write_bytes(b"new")
        assert (tmp_path / "out.bin").read_bytes() == b"old"

    write_atomically(tmp_path / "out.bin", write)
    assert (tmp_path / "out.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, RuntimeError])
def test_every_exit_path_removes_the_temp(tmp_path, mode, error):
    def write(target: Path) -> None:
        target.write_bytes(b"half")
        raise error("stop")

    with pytest.raises((error, WriteError)):
        write_atomically(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_a_stale_temp_of_a_dead_process_is_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".out.bin.ckpt-doctor-{dead}-0123abcd.tmp"
    stale.write_bytes(b"left by a SIGKILL")
    live = tmp_path / f".x.ckpt-doctor-{os.getpid()}-0123abcd.tmp"
    live.write_bytes(b"ours, still running")
    other = tmp_path / ".out.bin.abc.tmp"  # not our name pattern: never touched
    other.write_bytes(b"someone else's")
    assert sweep_temps(tmp_path) == [stale]
    write_atomically(tmp_path / "out.bin", lambda t: t.write_bytes(b"ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out.bin"])


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ckpt_doctor import atomic, cli
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "named":
        atomic._link_mode[str(folder)] = "named"
    cli.install_signal_handlers()

    def write(target):
        with open(target, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            print("writing", flush=True)
            time.sleep(30)

    try:
        atomic.write_atomically(folder / "out.bin", write)
    except KeyboardInterrupt:
        sys.exit(143)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_mid_write_leaves_nothing(tmp_path, mode, sig):
    folder = tmp_path / "out"
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder), mode], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout.readline() == b"writing\n"
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    left = sorted(p.name for p in folder.iterdir())
    if sig == signal.SIGTERM:
        assert code == 143 and left == []  # cleaned up like Ctrl-C
    elif mode == "anonymous":
        assert code == -9 and left == []  # nothing ever had a name
    else:  # a SIGKILL cannot be caught: the named temp stays until the next write sweeps it
        assert len(left) == 1 and left[0].startswith(".out.bin.ckpt-doctor-")
        write_atomically(folder / "out.bin", lambda t: t.write_bytes(b"ok"))
        assert sorted(p.name for p in folder.iterdir()) == ["out.bin"]


# --------------------------------------------------------------------------- environment


def _io_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [IO] cannot write"), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("raised", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(errno.EFBIG, "File too large"), "File too large"),
        (
            RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
            "write",
        ),
    ],
)
def test_a_failing_target_is_one_io_line_naming_the_path(
    world, tmp_path, monkeypatch, raised, words
):
    out = tmp_path / "a.pth"

    def fail(*_args, **_kwargs):
        raise raised

    monkeypatch.setattr(layouts, "_save", fail)
    line = _io_line(
        runner.invoke(app, ["extract", str(world / "checkpoint-4.pth"), "-o", str(out)])
    )
    assert str(out) in line and words in line and "hint:" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [world]


def test_a_directory_that_refuses_files_is_an_io_error(world, tmp_path, monkeypatch):
    real_open = os.open

    def no_create(path, flags, *args):
        if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_create)
    out = tmp_path / "ro" / "a.pth"
    out.parent.mkdir()
    line = _io_line(
        runner.invoke(app, ["extract", str(world / "checkpoint-4.pth"), "-o", str(out)])
    )
    assert "Permission denied" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory anyway")
def test_a_0555_directory_is_an_io_error(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = runner.invoke(
            app, ["extract", str(world / "checkpoint-4.pth"), "-o", str(ro / "a.pth")]
        )
        _io_line(result)
    finally:
        ro.chmod(0o755)


def test_ulimit_f_is_an_io_error_not_a_kill(world, tmp_path):
    out = tmp_path / "a.pth"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    cmd = [sys.executable, "-m", "ckpt_doctor", "extract", str(world / "checkpoint-4.pth")]
    proc = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=limit, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [IO] cannot write"), proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_sigterm_during_a_real_extract_cleans_up(world, tmp_path):
    """The CLI itself: a SIGTERM at any moment ends with exit 143 or a finished run, and
    never a partial output or a temp file."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "ckpt_doctor", "extract", str(world / "checkpoint-4.pth")]
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen([*cmd, "-o", str(out / "a.pth")], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        names = sorted(p.name for p in out.iterdir())
        # 143: our handler unwound; -15: before the handler was installed (imports) or after
        # Python restored the default at exit, once the output was complete.
        assert code in (143, -15, 0, 1) and names in ([], ["a.pth"]), (code, names)
        if names:
            assert set(torch.load(out / "a.pth", weights_only=True)) == EXPECTED, code
            (out / "a.pth").unlink()
