"""The README and docs/ stay true: every `$ ckpt-doctor ...` block prints what it shows, the
synopsis names every option, the findings page lists the whole catalogue, links resolve, and
nothing points at documents the project does not have."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ckpt_doctor.findings import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_blocks", ROOT / "docs/refresh_blocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


refresh = _refresh_module()


@pytest.mark.parametrize("path", refresh.FILES, ids=lambda p: p.name)
def test_every_command_block_prints_what_it_shows(path):
    assert not refresh.check_file(path), "\n\n".join(refresh.check_file(path))


def test_the_docs_have_command_blocks():
    counts = {p.name: len(refresh.FENCE.findall(p.read_text())) for p in refresh.FILES}
    assert counts["README.md"] >= 4
    assert sum(counts.values()) >= 8
    demo = refresh.FENCE.search((ROOT / "README.md").read_text()).group(1)
    assert demo.startswith("$ ckpt-doctor demo\n") and "eos is back" in demo


def test_block_parsing_and_normalising():
    block = "$ ckpt-doctor x\nline  \n$ echo $?\n1\n"
    assert [(s.command, s.shown) for s in refresh.steps(block)] == [
        ("ckpt-doctor x", "line  \n"),
        ("echo $?", "1\n"),
    ]
    shown = "at /tmp/ckpt-doctor-demo-ab_12x/adapter.safetensors   \n"
    assert refresh.normalise(shown) == "at /tmp/ckpt-doctor-demo-XXXX/adapter.safetensors\n"


def test_synopsis_names_every_option():
    """Every option of every command appears in the README (its synopsis or the text)."""
    from typer.main import get_command

    from ckpt_doctor.cli import app

    readme = (ROOT / "README.md").read_text()
    synopsis = readme[readme.index("## Commands") : readme.index("### `inspect`")]
    for name, command in get_command(app).commands.items():
        assert f"ckpt-doctor {name}" in synopsis
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            opts = [*param.opts, *param.secondary_opts]
            assert any(o in synopsis for o in opts), (name, opts)


def test_findings_page_lists_the_whole_catalogue():
    text = (ROOT / "docs/findings.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| (\w+)", text, flags=re.MULTILINE))
    assert set(rows) == set(CATALOGUE)
    assert rows == dict(CATALOGUE)  # with the catalogue's severity


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), (path.name, target)


def test_nothing_cites_documents_the_project_does_not_have():
    word = "SP" + "EC"  # spelt apart so that this file does not match itself
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.toml", "*.sh", ".ci/*"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert len(files) > 40
    cited = [f for f in files if re.search(rf"\b{word}\b", (ROOT / f).read_text())]
    assert cited == []


def test_license_and_spdx_expression():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 the ")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject and "setuptools>=77" in pyproject
