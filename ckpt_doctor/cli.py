"""Command line: parse, call the library, render, exit. No logic of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer

from ckpt_doctor import __version__, timings
from ckpt_doctor.adapters import checkpoint_family
from ckpt_doctor.choices import CONVERT_TARGETS
from ckpt_doctor.diffing import diff_tensors
from ckpt_doctor.errors import CkptDoctorError, InternalError, UnreadableError, UsageError
from ckpt_doctor.inspection import inspect_checkpoint
from ckpt_doctor.options import (
    AttentionOpt,
    BaseOpt,
    CastOpt,
    Command,
    CudaGraphOpt,
    DebugOpt,
    DeepOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    GateOpt,
    Group,
    JsonOpt,
    LoadAsOpt,
    OutOpt,
    PathArg,
    PromptOpt,
    QuietOpt,
    ReportOpt,
    SeedOpt,
    TemperatureOpt,
    TemplateOpt,
    TensorsOpt,
    TokenizerOpt,
    TopPOpt,
    TrustOpt,
    generation_config,
)
from ckpt_doctor.progress import Progress, as_bytes
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

_state = {"debug": False, "quiet": False}


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
    _state["debug"] = debug or os.environ.get("CKPT_DOCTOR_DEBUG", "") not in ("", "0")
    _state["quiet"] = quiet


def _common(debug: bool, quiet: bool) -> None:
    """--debug and --quiet given after the command name, as well as before it."""
    _state["debug"] = _state["debug"] or debug
    _state["quiet"] = _state["quiet"] or quiet


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


def _run(as_json: bool, body: Callable[[], int]) -> None:
    """The one error table: every error becomes one stderr line (and, with --json, one JSON
    document on stdout) and its exit code; --debug adds the traceback but keeps the code."""
    from ckpt_doctor import render

    try:
        code = body()
    except CkptDoctorError as exc:
        _fail(as_json, exc, exc)
    except KeyboardInterrupt as exc:
        # Every `finally` and `except BaseException` below has run: temp files are gone.
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        render.status_line("interrupted" if signum == signal.SIGINT else "terminated")
        raise typer.Exit(128 + signum) from None
    except BrokenPipeError:  # stdout closed (| head): not an error to report
        raise
    except Exception as exc:
        _fail(as_json, _last_net(exc), exc)
    raise typer.Exit(code)


def _last_net(exc: Exception) -> CkptDoctorError:
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


def _fail(as_json: bool, error: CkptDoctorError, raised: BaseException) -> NoReturn:
    from ckpt_doctor import render

    if _state["debug"]:
        traceback.print_exception(raised, file=sys.stderr)
    if as_json:
        render.print_json(render.error_json(error))
    render.error_line(error)
    # Not re-raised under --debug: exit 1 means "findings", an error must stay 2.
    raise typer.Exit(error.exit_code) from None


def _open(stack: ExitStack, *paths: Path | None, trust_pickle: bool) -> list[Checkpoint | None]:
    """Open every given path lazily (None stays None); all close when the stack does."""
    return [
        stack.enter_context(open_checkpoint(p, trust_pickle=trust_pickle)) if p else None
        for p in paths
    ]


def _emit(as_json: bool, report: Any, show: Callable[[Any], None]) -> None:
    """Data on stdout; a report that is a refusal (diagnose of an unreadable file) also says
    so on stderr, as one error line, and without --json shows nothing else."""
    from ckpt_doctor import render

    refused = getattr(report, "refused", None)
    if as_json:
        render.print_json(report.to_json())
    elif refused is not None:
        pass  # the error line below is all there is to say
    elif _state["quiet"]:
        render.render_quiet(report)
    else:
        show(report)
    if refused is not None:
        render.error_line(refused)
    if _state["debug"] and getattr(report, "timings", None):  # smoke-generate, diagnose
        from ckpt_doctor.timings import text

        render.status_line(text(report.timings))


def _progress() -> AbstractContextManager[Progress | None]:
    """Progress on stderr when a person is watching it (a terminal) and did not ask for
    --quiet; nothing in pipes, logs and tests (stdout, --json's included, is never touched)."""
    from ckpt_doctor import render

    return render.progress_view(enabled=sys.stderr.isatty() and not _state["quiet"])


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
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render

        with ExitStack() as stack:
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            with _progress() as progress:
                report = inspect_checkpoint(
                    ckpt,
                    base=base_ckpt,
                    deep=deep,
                    progress=as_bytes(progress, "comparing with base"),
                    tensors_glob=tensors,
                )
            _emit(as_json, report, render.render_inspect)
            return report.exit_code

    _run(as_json, body)


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
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render

        with (
            open_checkpoint(path, trust_pickle=trust_pickle) as ckpt,
            open_checkpoint(base, trust_pickle=trust_pickle) as base_ckpt,
        ):
            family = checkpoint_family(ckpt.borrow_params(base_ckpt))
            with _progress() as progress:
                report = diff_tensors(
                    ckpt.canonical(),
                    base_ckpt.canonical(),
                    family=family,
                    progress=as_bytes(progress, "diff"),
                )
            _emit(as_json, report, lambda r: render.render_diff(r, show_all=show_all))
            return report.exit_code

    _run(as_json, body)


@app.command(cls=Command, short_help="Extract the adapter into a flat file upstream loads.")
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
    """Extract the adapter tensors into a flat file that upstream example.py loads."""
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.extraction import extract as run_extract

        with ExitStack() as stack:
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            with _progress() as progress:
                result = run_extract(
                    ckpt,
                    out,
                    base=base_ckpt,
                    fmt=fmt,
                    dtype=dtype,
                    force=force,
                    progress=as_bytes(progress, "comparing with base"),
                )
        _emit(as_json, result, render.render_extraction)
        return result.exit_code

    _run(as_json, body)


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
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.verification import verify as run_verify

        with ExitStack() as stack:
            opened = _open(stack, adapter, base, full, trust_pickle=trust_pickle)
            with _progress() as progress:
                report = run_verify(opened[0], base=opened[1], full=opened[2], progress=progress)
        _emit(as_json, report, render.render_verify)
        return report.exit_code

    _run(as_json, body)


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
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.repair import repair as run_repair

        with ExitStack() as stack:
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            with _progress() as progress:
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
        _emit(as_json, report, render.render_repair)
        return report.exit_code

    _run(as_json, body)


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
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            result = run_convert(ckpt, out, to=to, base=base_ckpt, fmt=fmt, force=force)
        _emit(as_json, result, render.render_conversion)
        return result.exit_code

    _run(as_json, body)


@app.command(cls=Command, short_help="Find why a checkpoint misbehaves, and the fix.")
def diagnose(
    path: PathArg,
    base: Annotated[Path, typer.Option("--base", help="Base weights the fine-tune started from.")],
    tokenizer: TokenizerOpt = None,
    prompt: PromptOpt = None,
    template: TemplateOpt = "alpaca",
    max_new_tokens: Annotated[int, typer.Option(help="Per prompt, per smoke arm.")] = 64,
    gate: GateOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: AttentionOpt = "auto",
    cuda_graph: CudaGraphOpt = True,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Find the root cause of a misbehaving checkpoint and the command that fixes it."""
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import parallel, render_runs
        from ckpt_doctor.diagnosis import diagnose as run_diagnose
        from ckpt_doctor.report import check_report_path, write_report

        parallel.refuse("diagnose")
        check_report_path(report, inputs=[path, base])
        config = generation_config(max_new_tokens, template, temperature, top_p, seed, cuda_graph)
        with _progress() as progress, timings.recording(since_process_start=True) as rec:
            result = run_diagnose(
                path,
                base,
                tokenizer_path=tokenizer,
                prompts=prompt,
                trust_pickle=trust_pickle,
                dtype=dtype,
                device=device,
                config=config,
                gate_fn=gate,
                attention=attention,
                progress=progress,
            )
        result.timings = rec.to_json()
        write_report(report, result)
        _emit(as_json, result, render_runs.render_diagnosis)
        return result.exit_code

    _run(as_json, body)


@app.command(
    "smoke-generate", cls=Command, short_help="Generate; tell eos from loop from max tokens."
)
def smoke_generate(
    base: Annotated[Path, typer.Option("--base", help="Base weights (Meta / HF directory).")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="Adapter-only file to load on the base.")
    ] = None,
    full: Annotated[
        Path | None, typer.Option("--full", help="Full / training checkpoint to load.")
    ] = None,
    tokenizer: TokenizerOpt = None,
    prompt: PromptOpt = None,
    template: TemplateOpt = "alpaca",
    max_new_tokens: Annotated[int, typer.Option(help="Stop a prompt after this many.")] = 128,
    gate: GateOpt = None,
    load_as: LoadAsOpt = "strict",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: AttentionOpt = "auto",
    cuda_graph: CudaGraphOpt = True,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate with the reference model and tell eos from loop from max tokens."""
    _common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import parallel, render_runs
        from ckpt_doctor.report import check_report_path, write_report
        from ckpt_doctor.smoke import smoke_generate as run_smoke

        check_report_path(report, inputs=[p for p in (base, adapter, full) if p])
        config = generation_config(max_new_tokens, template, temperature, top_p, seed, cuda_graph)
        shard = parallel.join(device)  # under torchrun: this process's part, else None
        with ExitStack() as stack, timings.recording(since_process_start=True) as rec:
            with timings.phase("read"):
                own = parallel.open_base(base, shard, trust_pickle=trust_pickle)
                opened = [
                    stack.enter_context(own),
                    *_open(stack, adapter, full, trust_pickle=trust_pickle),
                ]
            with _progress() if not (shard and shard.rank) else nullcontext() as progress:
                result = run_smoke(
                    opened[0],  # type: ignore[arg-type]
                    adapter=opened[1],
                    full=opened[2],
                    tokenizer_path=tokenizer,
                    prompts=prompt,
                    config=config,
                    load_as=load_as,
                    dtype=dtype,
                    device=device,
                    gate_fn=gate,
                    attention=attention,
                    progress=progress,
                    shard=shard,
                )
        result.timings = rec.to_json()
        if shard is not None and shard.rank:  # one report, from rank 0
            return result.exit_code
        write_report(report, result)
        _emit(as_json, result, render_runs.render_smoke)
        return result.exit_code

    _run(as_json, body)


@app.command(cls=Command, short_help="The whole story on the bundled fixture world.")
def demo(
    world: Annotated[
        Path | None, typer.Option("--world", help="Fixture world dir (default: fixtures/world).")
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole story on the bundled fixtures: loop, diagnose, extract, verify, eos."""
    _common(debug, quiet)

    def body() -> int:
        import tempfile

        from ckpt_doctor import render, render_runs
        from ckpt_doctor.demo import WORLD, run_demo

        with tempfile.TemporaryDirectory(prefix="ckpt-doctor-demo-") as tmp:
            with _progress() as progress:
                result = run_demo(Path(tmp), world=world or WORLD, progress=progress)
            if _state["quiet"]:
                render.render_quiet(result)
            else:
                render_runs.render_demo(result)
        return result.exit_code

    _run(False, body)


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
