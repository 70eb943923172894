"""The command line's options: their types, the values they take (shown in --help), their
help texts. cli.py declares the commands with them."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer.core

from ckpt_doctor.choices import ATTENTION, DEVICES, DTYPE_ALIASES, DTYPES, LOAD_MODES
from ckpt_doctor.extraction import CAST_DTYPES, FORMATS
from ckpt_doctor.families import GATE_FUNCTIONS
from ckpt_doctor.tokenizer import TEMPLATES


class Choice(click.Choice):
    """A choice shown as [a|b|c] in --help that also takes the aliases people type
    (--dtype bf16), each turned into its canonical value before the command sees it."""

    def __init__(self, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> None:
        super().__init__(choices, case_sensitive=False)
        self.aliases = aliases or {}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(self.aliases.get(str(value).lower(), value), param, ctx)


ALIASES = ", ".join(
    f"{a}={c}" for a, c in DTYPE_ALIASES.items() if a in ("bf16", "fp16", "half", "fp32")
)
PathArg = Annotated[Path, typer.Argument(help="Checkpoint file or directory (Meta, HF).")]
BaseOpt = Annotated[
    Path | None, typer.Option("--base", help="Base weights (file or Meta / HF directory).")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        click_type=Choice(DTYPES, DTYPE_ALIASES),
        help=f"Model dtype; auto: the file's on a GPU, float32 on the CPU ({ALIASES}).",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option(click_type=Choice(DEVICES), help="auto: cuda when torch sees one.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Output .pth or .safetensors.")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        click_type=Choice(FORMATS),
        help="Output format (default: by OUT's suffix).",
    ),
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
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show full tracebacks (or CKPT_DOCTOR_DEBUG=1).")
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress on stderr; print only the findings and the verdict."
    ),
]
# smoke-generate's generation options, which diagnose takes too.
TemplateOpt = Annotated[
    str, typer.Option(click_type=Choice(tuple(TEMPLATES)), help="Prompt template.")
]
GateOpt = Annotated[
    str | None,
    typer.Option(
        click_type=Choice(GATE_FUNCTIONS),
        help="Gate function: raw or tanh (default: the adapter family's own; LLaMA-Adapter v1 "
        "lets you pick: raw as upstream inference, tanh as its training).",
    ),
]
AttentionOpt = Annotated[
    str,
    typer.Option(
        click_type=Choice(ATTENTION),
        help="reference: PyTorch; fused: the Triton kernels (CUDA); auto: fused where it can.",
    ),
]
CudaGraphOpt = Annotated[
    bool,
    typer.Option(
        "--cuda-graph/--no-cuda-graph", help="On CUDA, replay each decode step as a graph."
    ),
]
TemperatureOpt = Annotated[float, typer.Option(help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed.")]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        help="Also write the run to FILE: .md (Markdown) or .html (one page with charts).",
    ),
]


def _plain_help(format_help: Any, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """click's plain help (every text wrapped at the terminal width, nothing cut), without the
    backslashes typer puts before "[default: ...]" for rich markup it does not use here."""
    plain = ctx.make_formatter()
    format_help(ctx, plain)
    formatter.write(plain.getvalue().replace("\\[", "["))


class Group(typer.core.TyperGroup):
    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _plain_help(super().format_help, ctx, formatter)


class Command(typer.core.TyperCommand):
    """Every command: plain help, and options whose value may be left out (``--tensors``
    alone means ``--tensors '*'``: at the end of the line, or before another option)."""

    optional_values: typing.ClassVar[dict[str, str]] = {"--tensors": "*"}

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _plain_help(super().format_help, ctx, formatter)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        filled: list[str] = []
        for i, arg in enumerate(args):
            filled.append(arg)
            nxt = args[i + 1] if i + 1 < len(args) else None
            if arg in self.optional_values and (nxt is None or nxt.startswith("-")):
                filled.append(self.optional_values[arg])
        return super().parse_args(ctx, filled)


DeepOpt = Annotated[
    bool, typer.Option("--deep", help="Scan every tensor's values, not just the adapter's.")
]
TensorsOpt = Annotated[
    str | None,
    typer.Option(
        "--tensors",
        metavar="[GLOB]",
        help="List the tensors (name, shape, dtype, bytes) whose names match GLOB "
        "('layers.0.*'; all without one).",
    ),
]
LoadAsOpt = Annotated[
    str,
    typer.Option(
        click_type=Choice(LOAD_MODES),
        help="strict: resolve the container and prefixes, require every key; upstream: "
        "load_state_dict(strict=False) as upstream example.py.",
    ),
]
CastOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        click_type=Choice(CAST_DTYPES, DTYPE_ALIASES),
        help=f"Cast the adapter (default: keep its dtypes; {ALIASES}).",
    ),
]


def generation_config(
    max_new_tokens: int, template: str, temperature: float, top_p: float, seed: int, graph: bool
) -> Any:
    """smoke-generate's and diagnose's generation options as a GenerationConfig (which checks
    them before any model loads)."""
    from ckpt_doctor.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        template=template,
        cuda_graph=graph,
    )
