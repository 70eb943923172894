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

from ckpt_doctor import __version__
from ckpt_doctor.diffing import Progress, diff_tensors
from ckpt_doctor.errors import CkptDoctorError, InternalError, UnreadableError, UsageError
from ckpt_doctor.inspection import inspect_checkpoint
from ckpt_doctor.reader import Checkpoint, open_checkpoint

app = typer.Typer(
    name="ckpt-doctor",
    help="Find, prove and cure what is wrong with a fine-tuned LLaMA / LLaMA-Adapter checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

PathArg = Annotated[Path, typer.Argument(help="Checkpoint file or directory (Meta, HF).")]
BaseOpt = Annotated[
    Path | None, typer.Option("--base", help="Base weights (file or Meta / HF directory).")
]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Output .pth or .safetensors.")]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="pth or safetensors (default: by suffix).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option("--tokenizer", help="tokenizer.model or .json (default: beside the base)."),
]
PromptOpt = Annotated[
    list[str] | None, typer.Option("--prompt", help="An instruction; repeat for more.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Unpickle globals outside the allowlist. Runs code from the file: only for files "
        "you trust.",
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"ckpt-doctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks (or CKPT_DOCTOR_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    # Set on every invocation (tests run many in one process).
    _state["debug"] = debug or os.environ.get("CKPT_DOCTOR_DEBUG", "") not in ("", "0")


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
    elif refused is None:
        show(report)
    if refused is not None:
        render.error_line(refused)


def _progress(label: str) -> AbstractContextManager[Progress | None]:
    """A progress bar on stderr when a person is watching; nothing in pipes and tests."""
    from ckpt_doctor import render

    return render.progress_bar(label) if sys.stderr.isatty() else nullcontext(None)


@app.command()
def inspect(
    path: PathArg,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    deep: Annotated[
        bool, typer.Option("--deep", help="Scan every tensor's values, not just the adapter's.")
    ] = False,
) -> None:
    """Say what a checkpoint is, what is inside, and what is wrong with it."""

    def body() -> int:
        from ckpt_doctor import render

        with ExitStack() as stack:
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            with _progress("comparing with base") as progress:
                report = inspect_checkpoint(ckpt, base=base_ckpt, deep=deep, progress=progress)
            _emit(as_json, report, render.render_inspect)
            return report.exit_code

    _run(as_json, body)


@app.command()
def diff(
    path: PathArg,
    base: Annotated[Path, typer.Option("--base", help="Base weights to diff against.")],
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="List identical tensors in the table too.")
    ] = False,
) -> None:
    """Classify every tensor against the base: added, removed, modified, identical, ..."""

    def body() -> int:
        from ckpt_doctor import render

        with (
            open_checkpoint(path, trust_pickle=trust_pickle) as ckpt,
            open_checkpoint(base, trust_pickle=trust_pickle) as base_ckpt,
        ):
            with _progress("diff") as progress:
                report = diff_tensors(ckpt.canonical(), base_ckpt.canonical(), progress=progress)
            _emit(as_json, report, lambda r: render.render_diff(r, show_all=show_all))
            return report.exit_code

    _run(as_json, body)


@app.command()
def extract(
    path: PathArg,
    out: OutOpt,
    base: BaseOpt = None,
    fmt: FormatOpt = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Cast the adapter (default: keep dtypes).")
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Extract the adapter tensors into a flat file that upstream example.py loads."""

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.extraction import extract as run_extract

        with ExitStack() as stack:
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            with _progress("comparing with base") as progress:
                result = run_extract(
                    ckpt,
                    out,
                    base=base_ckpt,
                    fmt=fmt,
                    dtype=dtype,
                    force=force,
                    progress=progress,
                )
        _emit(as_json, result, render.render_extraction)
        return result.exit_code

    _run(as_json, body)


@app.command()
def verify(
    adapter: Annotated[Path, typer.Argument(help="The extracted adapter file.")],
    base: Annotated[Path, typer.Option("--base", help="Base weights the adapter goes on.")],
    full: Annotated[
        Path | None, typer.Option("--full", help="The checkpoint it was extracted from.")
    ] = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Prove an adapter is bit-exact, complete and loadable (and equals --full's model)."""

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.verification import verify as run_verify

        with ExitStack() as stack:
            opened = _open(stack, adapter, base, full, trust_pickle=trust_pickle)
            with _progress("comparing with base") as progress:
                report = run_verify(opened[0], base=opened[1], full=opened[2], progress=progress)
        _emit(as_json, report, render.render_verify)
        return report.exit_code

    _run(as_json, body)


@app.command()
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
) -> None:
    """Write a fixed copy: unwrap, strip prefixes, broadcast gates; list every change."""

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.repair import repair as run_repair

        with ExitStack() as stack:
            ckpt, base_ckpt = _open(stack, path, base, trust_pickle=trust_pickle)
            with _progress("comparing with base") as progress:
                report = run_repair(
                    ckpt,
                    out,
                    base=base_ckpt,
                    bake_tanh=bake_tanh,
                    restore_base=restore_base,
                    fmt=fmt,
                    force=force,
                    progress=progress,
                )
        _emit(as_json, report, render.render_repair)
        return report.exit_code

    _run(as_json, body)


@app.command()
def diagnose(
    path: PathArg,
    base: Annotated[Path, typer.Option("--base", help="Base weights the fine-tune started from.")],
    tokenizer: TokenizerOpt = None,
    prompt: PromptOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Per prompt, per smoke arm.")] = 64,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Find the root cause of a misbehaving checkpoint and the command that fixes it."""

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.diagnosis import diagnose as run_diagnose

        result = run_diagnose(
            path,
            base,
            tokenizer_path=tokenizer,
            prompts=prompt,
            max_new_tokens=max_new_tokens,
            trust_pickle=trust_pickle,
            dtype=dtype,
            device=device,
        )
        _emit(as_json, result, render.render_diagnosis)
        return result.exit_code

    _run(as_json, body)


@app.command("smoke-generate")
def smoke_generate(
    base: Annotated[Path, typer.Option("--base", help="Base weights (Meta / HF directory).")],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="Adapter-only file to load on the base.")
    ] = None,
    full: Annotated[
        Path | None, typer.Option("--full", help="Full / training checkpoint to load.")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer", help="tokenizer.model / tokenizer.json (default: beside base)."
        ),
    ] = None,
    prompt: PromptOpt = None,
    template: Annotated[str, typer.Option(help="Prompt template: alpaca or none.")] = "alpaca",
    max_new_tokens: Annotated[int, typer.Option(help="Stop a prompt after this many.")] = 128,
    gate: Annotated[str, typer.Option(help="Gate function: raw (upstream) or tanh.")] = "raw",
    load_as: Annotated[
        str, typer.Option(help="strict, or upstream (load_state_dict(strict=False)).")
    ] = "strict",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    attention: Annotated[str, typer.Option(help="auto, reference or fused.")] = "auto",
    cuda_graph: Annotated[
        bool,
        typer.Option(
            "--cuda-graph/--no-cuda-graph", help="On CUDA, replay each decode step as a graph."
        ),
    ] = True,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Generate with the reference model and tell eos from loop from max tokens."""

    def body() -> int:
        from ckpt_doctor import render
        from ckpt_doctor.generate import GenerationConfig
        from ckpt_doctor.smoke import smoke_generate as run_smoke

        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            template=template,
            cuda_graph=cuda_graph,
        )
        with ExitStack() as stack:
            opened = _open(stack, base, adapter, full, trust_pickle=trust_pickle)
            report = run_smoke(
                opened[0],
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
            )
        _emit(as_json, report, render.render_smoke)
        return report.exit_code

    _run(as_json, body)


@app.command()
def demo(
    world: Annotated[
        Path | None, typer.Option("--world", help="Fixture world dir (default: fixtures/world).")
    ] = None,
) -> None:
    """The whole story on the bundled fixtures: loop, diagnose, extract, verify, eos."""

    def body() -> int:
        import tempfile

        from ckpt_doctor import render
        from ckpt_doctor.demo import WORLD, run_demo

        with tempfile.TemporaryDirectory(prefix="ckpt-doctor-demo-") as tmp:
            result = run_demo(Path(tmp), world=world or WORLD)
            render.render_demo(result)
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

            hint = "see ckpt-doctor COMMAND --help"
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
