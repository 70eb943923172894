"""Write a file so that readers see either the old state or the complete new file, never half,
and never over anything a command read.

The data goes to an anonymous file (``O_TMPFILE``) in the destination's directory: it has no
name until it is complete and fsynced, then it is linked in (``linkat``), directly when the
destination is new, through a fresh name and an atomic rename when it replaces one. A kill at
any point leaves no partial destination and no temporary file. Where the filesystem has no
``O_TMPFILE`` (or linking it is not allowed), a dot-named temp file is used instead: removed on
every exit path (SIGTERM included, see cli.main), and one left by a SIGKILL is swept, by its
name pattern and once its process is gone, by the next write into that directory.

A failure of the target (full disk, read-only filesystem, no permission, ``ulimit -f``) is a
WriteError naming the path: the environment, not a bug.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import resource
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from ckpt_doctor import directories
from ckpt_doctor.errors import UsageError, WriteError

_TEMP_RE = re.compile(r"^\..+\.ckpt-doctor-(\d+)-[0-9a-f]{8}\.tmp$")
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
# Errors that say "this directory cannot take an anonymous file": fall back to a named one.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}
_link_mode: dict[str, str] = {}  # directory -> "empty-path" | "proc" | "named"


def check_destination(path: Path, *, force: bool, sources: list[Path]) -> None:
    """Refuse to overwrite without --force, and never (even with --force) write over an input
    or any file an input's reader reads, nor add a file an input directory's reader would
    pick up (a consolidated.01.pth written into a Meta base changes the base)."""
    resolved = path.resolve()
    for source in sources:
        if not source.exists():
            continue
        if source.is_dir():
            folder = source.resolve()
            if resolved.parent == folder and directories.claimed_name(resolved.name):
                raise UsageError(
                    f"{path}: the checkpoint directory {source} reads a file of that name",
                    hint="write the output outside the input's directory, or under another name",
                )
            if resolved.parent == folder.parent and resolved.name in directories.TOKENIZER_FILES:
                raise UsageError(
                    f"{path}: {source} would read it as its tokenizer",
                    hint="write the output under another name",
                )
        elif resolved == source.resolve() or (path.exists() and os.path.samefile(path, source)):
            raise UsageError(
                f"{path} is one of the inputs", hint="write the output to another path"
            )
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
    """Call ``write(target)`` on a file nobody can see yet; once it is complete and fsynced,
    it becomes ``path``. On any failure ``path`` keeps its old state and nothing is left."""
    directory = path.parent
    sweep_temps(directory)
    with _target_errors(path):
        if _mode(directory) == "named":
            _write_named(path, write)
        else:
            _write_anonymous(path, write)
        dir_fd = os.open(directory, os.O_RDONLY)  # persist the new name itself
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_anonymous(path: Path, write: Callable[[Path], None]) -> None:
    fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o666)
    try:
        _run_writer(write, Path(f"/proc/self/fd/{fd}"), path, lambda: os.fstat(fd).st_size)
        os.fsync(fd)
        if not path.exists() and _link(fd, path):
            return
        # Replacing: link under a fresh name, then rename over the destination (atomic).
        tmp = _temp_name(path)
        if not _link(fd, tmp):  # pragma: no cover - the probe said linking works here
            raise OSError(errno.EXDEV, "cannot link the finished file", str(path))
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    finally:
        os.close(fd)


def _write_named(path: Path, write: Callable[[Path], None]) -> None:
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        _run_writer(write, tmp, path, lambda: tmp.stat().st_size)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would have given the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.ckpt-doctor-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _link(fd: int, target: Path) -> bool:
    """Give the anonymous file ``fd`` the name ``target``; False if it already exists."""
    try:
        if _link_mode.get(str(target.parent)) == "empty-path":
            _linkat_empty(fd, target)
        else:
            os.link(f"/proc/self/fd/{fd}", target, follow_symlinks=True)
    except FileExistsError:
        return False
    return True


def _linkat_empty(fd: int, target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(target), _AT_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def _mode(directory: Path) -> str:
    """How this directory takes a finished anonymous file, found once by linking an empty
    one under a probe name (removed at once): linkat(AT_EMPTY_PATH) where privileged, else
    through /proc/self/fd; "named" where neither works or O_TMPFILE is not supported."""
    key = str(directory)
    if key in _link_mode:
        return _link_mode[key]
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            _link_mode[key] = "named"
            return "named"
        raise
    mode = "named"
    try:
        for candidate in ("empty-path", "proc"):
            probe = directory / f".ckpt-doctor-{os.getpid()}-{secrets.token_hex(4)}.probe.tmp"
            try:
                if candidate == "empty-path":
                    _linkat_empty(fd, probe)
                else:
                    os.link(f"/proc/self/fd/{fd}", probe, follow_symlinks=True)
            except (OSError, AttributeError):
                continue
            probe.unlink()
            mode = candidate
            break
    finally:
        os.close(fd)
    _link_mode[key] = mode
    return mode


def sweep_temps(directory: Path) -> list[Path]:
    """Remove temp files a killed ckpt-doctor left in ``directory`` (its name pattern, and
    only once the process that made it is gone)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TEMP_RE.match(entry.name) or re.match(
                r"^\.ckpt-doctor-(\d+)-[0-9a-f]{8}\.probe\.tmp$", entry.name
            )
            if m is None or _alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_STORAGE_WORDS = ("No space", "File too large", "Read-only", "Permission denied", "os error")
_LOW_SPACE = 1 << 20


def _run_writer(
    write: Callable[[Path], None], target: Path, path: Path, written: Callable[[], int]
) -> None:
    """Run a writer (torch.save, safetensors): a RuntimeError it raises because the target
    failed (torch reports a short write as "unexpected pos") is a WriteError, recognised by
    its message or by the target's state: a size limit reached, the disk (almost) full."""
    try:
        write(target)
    except OSError:
        raise
    except Exception as exc:
        if type(exc).__name__ not in ("RuntimeError", "SafetensorError"):
            raise
        code = _storage_errno(path.parent, written())
        text = (str(exc).splitlines() or [""])[0][:200]
        if code is None and not any(w in text for w in (*_STORAGE_WORDS, "write", "pos ")):
            raise
        reason = os.strerror(code) if code is not None else text
        raise WriteError(f"cannot write {path}: {reason}", hint=_hint(code)) from exc


def _storage_errno(directory: Path, written: int) -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and written >= soft - 65536:
        return errno.EFBIG
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return errno.ENOSPC if st.f_bavail * st.f_frsize < _LOW_SPACE else None


@contextlib.contextmanager
def _target_errors(path: Path) -> Iterator[None]:
    """The environment refusing the write (OSError from opening, linking, renaming, syncing,
    or a writer's, see _run_writer) becomes a WriteError naming the path."""
    try:
        yield
    except OSError as exc:
        raise WriteError(
            f"cannot write {path}: {exc.strerror or exc}", hint=_hint(exc.errno)
        ) from exc


def _hint(code: int | None) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space or write the output elsewhere; nothing was written"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "write the output to a writable directory; nothing was written"
    if code == errno.EFBIG:
        return "a file size limit (ulimit -f) stopped the write; raise it; nothing was written"
    return "check the disk space, permissions and size limits of the target; nothing was written"
