"""The command line's machinery, shared by every command: the Typer app, --debug / --quiet,
the one error table (every error one stderr line and an exit code; with --json one JSON
document), signals, and how a report reaches stdout. The commands are in cli.py (the files)
and cli_runs.py (the ones that run the model)."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from ckpt_doctor import __version__
from ckpt_doctor.errors import CkptDoctorError, InternalError, UnreadableError, UsageError
from ckpt_doctor.options import DebugOpt, Group, QuietOpt
from ckpt_doctor.progress import Progress
from ckpt_doctor.reader import Checkpoint, open_checkpoint

app = typer.Typer(
    name="ckpt-doctor",
    help="Find, prove and cure what is wrong with a fine-tuned LLaMA / LLaMA-Adapter checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: it wraps every text at the terminal width; rich's panels cut option
    # names and help words with an ellipsis at 80 columns.
    rich_markup_mode=None,
    cls=Group,
)

state = {"debug": False, "quiet": False}


def _version(value: bool) -> None:
    if value:
        print(f"ckpt-doctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: DebugOpt = False,
    quiet: QuietOpt = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    # Set on every invocation (tests run many in one process).
    state["debug"] = debug or os.environ.get("CKPT_DOCTOR_DEBUG", "") not in ("", "0")
    state["quiet"] = quiet


def common(debug: bool, quiet: bool) -> None:
    """--debug and --quiet given after the command name, as well as before it."""
    state["debug"] = state["debug"] or debug
    state["quiet"] = state["quiet"] or quiet


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised where Python next runs so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C (temp files removed); SIGXFSZ (ulimit -f) is
    ignored so that the write fails with EFBIG and is reported, instead of killing us."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def run(as_json: bool, body: Callable[[], int]) -> None:
    """The one error table: every error becomes one stderr line (and, with --json, one JSON
    document on stdout) and its exit code; --debug adds the traceback but keeps the code."""
    from ckpt_doctor import render

    try:
        code = body()
    except CkptDoctorError as exc:
        fail(as_json, exc, exc)
    except KeyboardInterrupt as exc:
        # Every `finally` and `except BaseException` below has run: temp files are gone.
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        render.status_line("interrupted" if signum == signal.SIGINT else "terminated")
        raise typer.Exit(128 + signum) from None
    except BrokenPipeError:  # stdout closed (| head): not an error to report
        raise
    except Exception as exc:
        fail(as_json, last_net(exc), exc)
    raise typer.Exit(code)


def last_net(exc: Exception) -> CkptDoctorError:
    """What no layer below turned into a typed error. The environment (a file system error,
    memory) is not a bug; anything else is, and says so."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return UsageError(
            f"{where}{exc.strerror or type(exc).__name__}",
            hint="check the path, its permissions and the free disk space",
            code="IO",
        )
    if isinstance(exc, MemoryError):
        return UnreadableError(
            "ran out of memory: an input claims more than this machine holds",
            hint="check the inputs are the checkpoints you meant; re-run with --debug for where",
        )
    first = (str(exc).splitlines() or [""])[0][:300]
    return InternalError(
        f"{type(exc).__name__}: {first}",
        hint="a bug in ckpt-doctor: re-run with --debug for the traceback and report it",
    )


def fail(as_json: bool, error: CkptDoctorError, raised: BaseException) -> NoReturn:
    from ckpt_doctor import render

    if state["debug"]:
        traceback.print_exception(raised, file=sys.stderr)
    rank = _other_rank()
    if as_json and rank is None:  # under torchrun, stdout holds rank 0's document alone
        render.print_json(render.error_json(error))
    render.error_line(error, source="" if rank is None else f"rank {rank}")
    # Not re-raised under --debug: exit 1 means "findings", an error must stay 2.
    raise typer.Exit(error.exit_code) from None


def _other_rank() -> str | None:
    """This process's rank when torchrun started several and it is not rank 0 (the one that
    reports), else None. From the environment: an error may come before the group is joined."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):
        return None
    rank = os.environ.get("RANK", "0")
    return None if rank == "0" else rank


def open_all(stack: ExitStack, *paths: Path | None, trust_pickle: bool) -> list[Checkpoint | None]:
    """Open every given path lazily (None stays None); all close when the stack does."""
    return [
        stack.enter_context(open_checkpoint(p, trust_pickle=trust_pickle)) if p else None
        for p in paths
    ]


def emit(as_json: bool, report: Any, show: Callable[[Any], None]) -> None:
    """Data on stdout; a report that is a refusal (diagnose of an unreadable file) also says
    so on stderr, as one error line, and without --json shows nothing else."""
    from ckpt_doctor import render

    refused = getattr(report, "refused", None)
    if as_json:
        render.print_json(report.to_json())
    elif refused is not None:
        pass  # the error line below is all there is to say
    elif state["quiet"]:
        render.render_quiet(report)
    else:
        show(report)
    if refused is not None:
        render.error_line(refused)
    if state["debug"] and getattr(report, "timings", None):  # smoke-generate, diagnose
        from ckpt_doctor.timings import text

        render.status_line(text(report.timings))


def show_progress() -> AbstractContextManager[Progress | None]:
    """Progress on stderr when a person is watching it (a terminal) and did not ask for
    --quiet; nothing in pipes, logs and tests (stdout, --json's included, is never touched)."""
    from ckpt_doctor import render

    return render.progress_view(enabled=sys.stderr.isatty() and not state["quiet"])
