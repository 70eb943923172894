"""The commands that run the model: diagnose, smoke-generate, demo (see cli.py)."""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Annotated

import typer

from ckpt_doctor import timings
from ckpt_doctor.cli_app import app, common, emit, open_all, run, show_progress, state
from ckpt_doctor.options import (
    AttentionOpt,
    Command,
    CudaGraphOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    GateOpt,
    JsonOpt,
    LoadAsOpt,
    PathArg,
    PromptOpt,
    QuietOpt,
    ReportOpt,
    SeedOpt,
    TemperatureOpt,
    TemplateOpt,
    TokenizerOpt,
    TopPOpt,
    TrustOpt,
    generation_config,
)


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
    common(debug, quiet)

    def body() -> int:
        from ckpt_doctor import parallel, render_runs
        from ckpt_doctor.diagnosis import diagnose as run_diagnose
        from ckpt_doctor.report import check_report_path, write_report

        parallel.refuse("diagnose")
        check_report_path(report, inputs=[path, base])
        config = generation_config(max_new_tokens, template, temperature, top_p, seed, cuda_graph)
        with show_progress() as progress, timings.recording(since_process_start=True) as rec:
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
        emit(as_json, result, render_runs.render_diagnosis)
        return result.exit_code

    run(as_json, body)


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
    common(debug, quiet)

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
                    *open_all(stack, adapter, full, trust_pickle=trust_pickle),
                ]
            with show_progress() if not (shard and shard.rank) else nullcontext() as progress:
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
        emit(as_json, result, render_runs.render_smoke)
        return result.exit_code

    run(as_json, body)


@app.command(cls=Command, short_help="The whole story on the bundled fixture world.")
def demo(
    world: Annotated[
        Path | None, typer.Option("--world", help="Fixture world dir (default: fixtures/world).")
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The whole story on the bundled fixtures: loop, diagnose, extract, verify, eos."""
    common(debug, quiet)

    def body() -> int:
        import tempfile

        from ckpt_doctor import render, render_runs
        from ckpt_doctor.demo import WORLD, run_demo

        with tempfile.TemporaryDirectory(prefix="ckpt-doctor-demo-") as tmp:
            with show_progress() as progress:
                result = run_demo(Path(tmp), world=world or WORLD, progress=progress)
            if state["quiet"]:
                render.render_quiet(result)
            else:
                render_runs.render_demo(result)
        return result.exit_code

    run(False, body)
