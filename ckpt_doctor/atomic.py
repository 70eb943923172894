"""Write a file so that readers see either the old state or the complete new file, never half.

The data goes to a temporary file in the destination's directory (same filesystem, so the
final rename is atomic), is fsynced, and only then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ckpt_doctor.errors import UsageError


def check_destination(path: Path, *, force: bool, sources: list[Path]) -> None:
    """Refuse to overwrite without --force, and never overwrite an input."""
    resolved = path.resolve()
    if any(resolved == s.resolve() for s in sources if s.exists()):
        raise UsageError(f"{path} is one of the inputs", hint="write the output to another path")
    if path.is_dir():  # even --force must not replace a directory (os.replace cannot anyway)
        raise UsageError(
            f"{path} is a directory", hint="give a file name, e.g. -o DIR/adapter.safetensors"
        )
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="pass --force to replace it")
    if not path.parent.exists():
        raise UsageError(f"{path.parent} does not exist", hint="create the directory first")


def _umask() -> int:
    # The only way to read the umask is to set it; put it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)``, fsync, rename to ``path``; on any failure remove tmp, keep path."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 and the rename keeps it: give the file the mode open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # Persist the rename itself.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
