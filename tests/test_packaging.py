"""The wheel ships the kernels (as ckpt_doctor.kernels), and the package imports without Triton."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_kernels(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("ckpt_doctor", "kernels"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*cmd, "-w", str(tmp_path / "dist"), str(src)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ckpt_doctor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "launch", "reference", "triton_attention", "aot"):
        assert f"ckpt_doctor/kernels/{module}.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # no top-level "kernels" package
    # the SPDX license expression, and the license text itself
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(metadata).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_package_imports_without_triton():
    """A finder that refuses triton: the CLI, the model and the kernels package still import,
    and the fused path says why it cannot run."""
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'")
sys.meta_path.insert(0, NoTriton())
import importlib.util
importlib.util.find_spec = (lambda f: lambda name, *a: None if name == "triton" else f(name, *a))(
    importlib.util.find_spec)
import torch
import ckpt_doctor.cli, ckpt_doctor.model
from ckpt_doctor.kernels import fused_unavailable_reason
print(fused_unavailable_reason(torch.device("cuda")))
assert "triton" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Triton is not installed" in done.stdout


@pytest.mark.parametrize(
    ("installed", "usable"),
    [("3.0.0", False), ("3.3.1+git1", False), ("3.4.0", True), ("3.6.0", True), ("4.0.0", True)],
)
def test_a_triton_too_old_for_the_kernels_is_named_and_auto_takes_the_reference(
    monkeypatch, installed, usable
):
    """torch 2.4 pins Triton 3.0, whose compiler rejects the kernels: the fused path says so
    before a launch, auto picks the PyTorch reference, --attention fused is a usage error."""
    import importlib.metadata

    import torch
    from ckpt_doctor.kernels import fused_unavailable_reason, launch

    from ckpt_doctor.errors import UsageError
    from ckpt_doctor.smoke import resolve_attention

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: installed)
    launch.triton_problem.cache_clear()
    try:
        cuda = torch.device("cuda")
        reason = fused_unavailable_reason(cuda)
        if usable:
            assert reason is None
            assert resolve_attention("auto", cuda) == "fused"
            return
        assert reason is not None and f"Triton {installed} is installed" in reason
        assert "triton>=3.4" in reason
        assert resolve_attention("auto", cuda) == "reference"
        with pytest.raises(UsageError, match="cannot run: Triton"):
            resolve_attention("fused", cuda)
    finally:
        launch.triton_problem.cache_clear()
