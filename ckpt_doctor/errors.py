"""Typed library errors. Each carries a finding id, a message with evidence and a hint.

The CLI maps every one of them to a single stderr line and an exit code; the library never
exits the process itself.
"""

from __future__ import annotations


class CkptDoctorError(Exception):
    """Base class: ``code`` is a stable id, ``hint`` says what to do about it."""

    code = "ERROR"
    exit_code = 2

    def __init__(self, message: str, *, hint: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:  # a finding id when the refusal is one (e.g. ADAPTER_MISSING)
            self.code = code


class UsageError(CkptDoctorError):
    """The command was asked for something that cannot work (bad flag combination, bad path)."""

    code = "USAGE"


class UnreadableError(CkptDoctorError):
    """Not a checkpoint, truncated, or a corrupt header."""

    code = "UNREADABLE"


class EmptyFileError(UnreadableError):
    """A zero-byte file: the save was interrupted or the disk was full."""

    code = "EMPTY"


class WriteError(UsageError):
    """The output cannot be written: a full disk, a read-only target, a size limit."""

    code = "IO"


class UnsafePickleError(CkptDoctorError):
    """The pickle references globals outside the allowlist; nothing was executed."""

    code = "UNSAFE_PICKLE"

    def __init__(self, message: str, *, globals_found: list[str], hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.globals_found = globals_found


class ModelLoadError(CkptDoctorError):
    """The weights cannot be put into the model (a base tensor is missing, a shape differs)."""


class RefusedError(CkptDoctorError):
    """A command would produce something wrong (an empty adapter, say), so it did nothing."""


class InternalError(CkptDoctorError):
    """An unexpected exception: a bug in ckpt-doctor, reported in the same shape as the rest."""

    code = "INTERNAL"
