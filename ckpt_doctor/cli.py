"""Command line: parse, call the library, render, exit. No logic of its own.

The commands that read and write files are here; the ones that run the model in
cli_runs.py; the machinery they share (the app, the one error table) in cli_app.py."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import click
import typer

from ckpt_doctor.adapters import checkpoint_family
from ckpt_doctor.choices import CONVERT_TARGETS
from ckpt_doctor.cli_app import (
    app,
    common,
    emit,
    install_signal_handlers,
    open_all,
    run,
    show_progress,
)
from ckpt_doctor.diffing import diff_tensors
from ckpt_doctor.errors import UsageError
from ckpt_doctor.inspection import inspect_checkpoint
from ckpt_doctor.options import (
    BaseOpt,
    CastOpt,
    Command,
    DebugOpt,
    DeepOpt,
    ForceOpt,
    FormatOpt,
    JsonOpt,
    OutOpt,
    PathArg,
    QuietOpt,
    TensorsOpt,
    TrustOpt,
)
from ckpt_doctor.progress import as_bytes
from ckpt_doctor.reader import open_checkpoint


@app.command(cls=Command, short_help="What a checkpoint is, holds, and what is wrong with it.")
def inspect(
    path: PathArg,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    deep: DeepOpt = False,
    tensors: TensorsOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Say what a checkpoint is, what is inside, and what is wrong with it."""
    common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render

        with ExitStack() as stack:
            ckpt, base_ckpt = open_all(stack, path, base, trust_pickle=trust_pickle)
            with show_progress() as progress:
                report = inspect_checkpoint(
                    ckpt,
                    base=base_ckpt,
                    deep=deep,
                    progress=as_bytes(progress, "comparing with base"),
                    tensors_glob=tensors,
                )
            emit(as_json, report, render.render_inspect)
            return report.exit_code

    run(as_json, body)


@app.command(cls=Command, short_help="Classify every tensor against the base.")
def diff(
    path: PathArg,
    base: Annotated[Path, typer.Option("--base", help="Base weights to diff against.")],
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="List identical tensors in the table too.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Classify every tensor against the base: added, removed, modified, identical, shape or
    dtype changed."""
    common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render

        with (
            open_checkpoint(path, trust_pickle=trust_pickle) as ckpt,
            open_checkpoint(base, trust_pickle=trust_pickle) as base_ckpt,
        ):
            family = checkpoint_family(ckpt.borrow_params(base_ckpt))
            with show_progress() as progress:
                report = diff_tensors(
                    ckpt.canonical(),
                    base_ckpt.canonical(),
                    family=family,
                    progress=as_bytes(progress, "diff"),
                )
            emit(as_json, report, lambda r: render.render_diff(r, show_all=show_all))
            return report.exit_code

    run(as_json, body)


@app.command(cls=Command, short_help="Extract the adapter, in the file its own code loads.")
def extract(
    path: PathArg,
    out: OutOpt,
    base: BaseOpt = None,
    fmt: FormatOpt = None,
    dtype: CastOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Extract the adapter, with its family's own names, in the file its own code loads (a
    flat file for LLaMA-Adapter v1, a {'model'} dict for v2, a directory for PEFT)."""
    common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.extraction import extract as run_extract

        with ExitStack() as stack:
            ckpt, base_ckpt = open_all(stack, path, base, trust_pickle=trust_pickle)
            with show_progress() as progress:
                result = run_extract(
                    ckpt,
                    out,
                    base=base_ckpt,
                    fmt=fmt,
                    dtype=dtype,
                    force=force,
                    progress=as_bytes(progress, "comparing with base"),
                )
        emit(as_json, result, render.render_extraction)
        return result.exit_code

    run(as_json, body)


@app.command(cls=Command, short_help="Prove an extracted adapter exact, complete, loadable.")
def verify(
    adapter: Annotated[Path, typer.Argument(help="The extracted adapter file.")],
    base: Annotated[Path, typer.Option("--base", help="Base weights the adapter goes on.")],
    full: Annotated[
        Path | None, typer.Option("--full", help="The checkpoint it was extracted from.")
    ] = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prove an adapter loadable and sound; with --full also bit-exact, complete and the same
    model (without it those three checks cannot run: the verdict says so, exit 0)."""
    common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.verification import verify as run_verify

        with ExitStack() as stack:
            opened = open_all(stack, adapter, base, full, trust_pickle=trust_pickle)
            with show_progress() as progress:
                report = run_verify(opened[0], base=opened[1], full=opened[2], progress=progress)
        emit(as_json, report, render.render_verify)
        return report.exit_code

    run(as_json, body)


@app.command(cls=Command, short_help="Write a fixed copy and list every change.")
def repair(
    path: PathArg,
    out: OutOpt,
    base: BaseOpt = None,
    bake_tanh: Annotated[
        bool, typer.Option("--bake-tanh", help="Gates g -> tanh(g) for raw-gate inference.")
    ] = False,
    restore_base: Annotated[
        bool, typer.Option("--restore-base", help="Put drifted frozen tensors back (--base).")
    ] = False,
    fmt: FormatOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a fixed copy: unwrap, strip prefixes, broadcast gates; list every change."""
    common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.repair import repair as run_repair

        with ExitStack() as stack:
            ckpt, base_ckpt = open_all(stack, path, base, trust_pickle=trust_pickle)
            with show_progress() as progress:
                report = run_repair(
                    ckpt,
                    out,
                    base=base_ckpt,
                    bake_tanh=bake_tanh,
                    restore_base=restore_base,
                    fmt=fmt,
                    force=force,
                    progress=as_bytes(progress, "comparing with base"),
                )
        emit(as_json, report, render.render_repair)
        return report.exit_code

    run(as_json, body)


@app.command(cls=Command, short_help="Convert an adapter between families, where exact.")
def convert(
    path: PathArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output file (v1) or directory (PEFT).")],
    to: Annotated[
        str,
        typer.Option(
            "--to", click_type=click.Choice(CONVERT_TARGETS), help="The family to convert into."
        ),
    ],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Base weights: layer/head counts, and a logits check."),
    ] = None,
    fmt: FormatOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Convert an adapter between families where the math is the same (v1 <-> PEFT)."""

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.convert import convert as run_convert

        with ExitStack() as stack:
            ckpt, base_ckpt = open_all(stack, path, base, trust_pickle=trust_pickle)
            result = run_convert(ckpt, out, to=to, base=base_ckpt, fmt=fmt, force=force)
        emit(as_json, result, render.render_conversion)
        return result.exit_code

    run(as_json, body)


# The commands that run the model register themselves on the same app.
from ckpt_doctor import cli_runs  # noqa: E402, F401


def main() -> None:
    """The console script. Click's own usage errors (a missing --base, a bad value) print its
    usage message on stderr and, under --json, one JSON document on stdout, like every other
    error; the commands' exit codes pass through. SIGTERM and SIGHUP clean up like Ctrl-C; a
    file size limit (ulimit -f) is a write error, not a kill by SIGXFSZ."""
    install_signal_handlers()
    # numpy's float warnings (NaN, overflow) in our own modules are about a file's values,
    # which the findings report; printed, they would break "one line per error" on stderr.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"ckpt_doctor(\.|$)")
    try:
        code = app(standalone_mode=False)
    except click.ClickException as exc:
        if "--json" in sys.argv[1:]:
            from ckpt_doctor import render

            ctx = getattr(exc, "ctx", None)  # the command being parsed, when click knows it
            hint = f"see {ctx.command_path if ctx else 'ckpt-doctor'} --help"
            render.print_json(render.error_json(UsageError(exc.format_message(), hint=hint)))
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)  # Ctrl-C during click's own parsing
    except BrokenPipeError:  # stdout closed early (| head): nothing left to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)
