"""Run the command blocks of README.md and docs/*.md, and check or rewrite what they show.

A block is a fenced code block whose first line starts with ``$ ckpt-doctor``. In it, each line
that starts with ``$ `` is a command (``ckpt-doctor ...`` or ``echo $?``) and the lines after it,
up to the next command, are what it prints (stdout and stderr together). The blocks of one
file run in order in one scratch directory that holds a link to the repository's fixtures/,
so paths read as they do from the repository root and outputs land in the scratch directory.
Output is compared after normalising what changes from run to run (temporary paths).

    python docs/refresh_blocks.py           # rewrite every block with what it prints now
    python docs/refresh_blocks.py --check   # exit 1 and show the differences instead

tests/test_docs.py runs the --check side.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COLUMNS = 100  # the width the blocks are printed at
FENCE = re.compile(r"^```[a-z]*\n(\$ ckpt-doctor .*?)^```\n", re.MULTILINE | re.DOTALL)
# What differs between two runs of the same command: the demo's temporary directory.
VOLATILE = [(re.compile(r"/tmp/ckpt-doctor-demo-[A-Za-z0-9_]+"), "/tmp/ckpt-doctor-demo-XXXX")]


@dataclass
class Step:
    command: str
    shown: str  # the lines after it, as written in the file


def steps(block: str) -> list[Step]:
    out: list[Step] = []
    for line in block.splitlines(keepends=True):
        if line.startswith("$ "):
            out.append(Step(line[2:].rstrip("\n"), ""))
        elif out:
            out[-1].shown += line
    return out


def normalise(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + ("\n" if text else "")


def run_steps(all_steps: list[Step], workdir: Path) -> list[str]:
    """What each step prints now, normalised."""
    env = {**os.environ, "COLUMNS": str(COLUMNS), "PYTHONPATH": str(ROOT)}
    env.pop("CKPT_DOCTOR_DEBUG", None)
    printed, last_code = [], 0
    for step in all_steps:
        args = shlex.split(step.command)
        if args == ["echo", "$?"]:
            printed.append(f"{last_code}\n")
            continue
        if args[0] != "ckpt-doctor":
            raise ValueError(f"a block may run ckpt-doctor and echo $? only: {step.command!r}")
        result = subprocess.run(
            [sys.executable, "-m", "ckpt_doctor", *args[1:]],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
            check=False,
        )
        last_code = result.returncode
        printed.append(normalise(result.stdout))
    return printed


def scratch() -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory(prefix="ckpt-doctor-docs-")
    (Path(tmp.name) / "fixtures").symlink_to(ROOT / "fixtures")
    return tmp


def check_file(path: Path) -> list[str]:
    """The differences between what the file's blocks show and what they print now."""
    text = path.read_text()
    blocks = [steps(m.group(1)) for m in FENCE.finditer(text)]
    flat = [s for b in blocks for s in b]
    with scratch() as tmp:
        printed = run_steps(flat, Path(tmp))
    problems = []
    for step, now in zip(flat, printed, strict=True):
        if normalise(step.shown) != now:
            diff = difflib.unified_diff(
                normalise(step.shown).splitlines(),
                now.splitlines(),
                "shown",
                "printed",
                lineterm="",
            )
            problems.append(f"{path.name}: $ {step.command}\n" + "\n".join(diff))
    return problems


def refresh_file(path: Path) -> bool:
    """Rewrite the file's blocks with what they print now; True when anything changed."""
    text = path.read_text()
    matches = list(FENCE.finditer(text))
    flat = [s for m in matches for s in steps(m.group(1))]
    with scratch() as tmp:
        printed = iter(run_steps(flat, Path(tmp)))
    out, end = [], 0
    for m in matches:
        body = "".join(f"$ {s.command}\n{next(printed)}" for s in steps(m.group(1)))
        out += [text[end : m.start(1)], body]
        end = m.end(1)
    new = "".join(out) + text[end:]
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not rewrite")
    parser.add_argument("files", nargs="*", type=Path, help="default: README.md, docs/*.md")
    ns = parser.parse_args(argv)
    files = ns.files or FILES
    if ns.check:
        problems = [p for f in files for p in check_file(f)]
        print("\n\n".join(problems) or "every block prints what it shows")
        return 1 if problems else 0
    for f in files:
        print(f"{f}: {'rewritten' if refresh_file(f) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
