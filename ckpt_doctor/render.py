"""The only module that imports rich: tables for people on stdout, progress on stderr.

Everything that comes from the user or the data (paths, prompts, generated text, tensor and
key names, messages, hints, exception text) goes in as rich ``Text`` or through ``escape``:
rich markup would otherwise eat or choke on its square brackets.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ckpt_doctor.diffing import DiffReport
from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.families import describe
from ckpt_doctor.findings import Finding, error_finding
from ckpt_doctor.inspection import InspectReport
from ckpt_doctor.units import human_bytes, human_count

if TYPE_CHECKING:  # these import torch, which inspect and diff must never pay for
    from ckpt_doctor.convert import Conversion
    from ckpt_doctor.demo import DemoResult
    from ckpt_doctor.diagnosis import Diagnosis
    from ckpt_doctor.extraction import Extraction
    from ckpt_doctor.generate import Result
    from ckpt_doctor.repair import RepairReport
    from ckpt_doctor.smoke import SmokeReport
    from ckpt_doctor.verification import VerifyReport

# No highlighting and no :emoji: codes: paths and names are printed as they are.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
STATUS_STYLE = {
    "added": "green",
    "removed": "red",
    "modified": "yellow",
    "identical": "dim",
    "shape_changed": "bold red",
    "dtype_changed": "magenta",
}


def json_safe(value: Any) -> Any:
    """The one JSON encoding rule: JSON has no NaN or Inf, so a non-finite float is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def print_json(doc: dict[str, Any]) -> None:
    """Exactly one JSON document on stdout, nothing else there."""
    sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(exc: CkptDoctorError) -> None:
    """One stderr line: never hard-wrapped (soft_wrap), never read as markup (Text)."""
    line = Text.assemble(("error", "bold red"), f" [{exc.code}] {_one_line(exc.message)}")
    if exc.hint:
        line.append(f" hint: {_one_line(exc.hint)}", style="dim")
    err.print(line, soft_wrap=True)


def error_json(exc: CkptDoctorError) -> dict[str, Any]:
    """The --json document of an error: the error, and the same as a finding of the shape
    every other finding has."""
    return {
        "error": {"id": exc.code, "message": exc.message, "hint": exc.hint},
        "findings": [error_finding(exc).to_json()],
    }


def status_line(message: str) -> None:
    """A plain one-line note on stderr ("interrupted")."""
    err.print(Text(message), soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Any]:
    """A byte-progress bar on stderr; yields the callback the library calls."""
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(escape(description), total=None)

        def update(done: int, total: int, name: str) -> None:
            # The description column is read as markup: the tensor name must not be.
            label = escape(f"{description} {name}")
            bar.update(task, completed=done, total=total, description=label)

        yield update


def _print_names_table(table: Table) -> None:
    """Print a table of tensor names at the width it needs. Narrower, rich shrinks the widest
    column first, and that is the name: cut with an ellipsis or folded mid-word. A line wider
    than the terminal wraps there but loses nothing, and a pipe gets one row per line."""
    needed = Measurement.get(out, out.options.update_width(100_000), table).maximum
    if needed <= out.width:
        out.print(table)
        return
    Console(highlight=False, emoji=False, width=needed).print(table)


def render_findings(findings: list[Finding]) -> None:
    """One row per finding: severity and id, the evidence, then what to do."""
    grid = Table.grid(padding=(0, 1, 1, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")  # long names in a message are folded, not cut
    for f in findings:
        style = SEVERITY_STYLE[f.severity]
        body = Text(f.message)
        body.append(f"\n-> {f.hint}", style="dim")
        grid.add_row(Text(f.severity, style), Text(f.id, style), body)
    out.print("[bold]Findings[/]")
    out.print(grid)


def render_inspect(report: InspectReport) -> None:
    out.print(Text.assemble((str(report.path), "bold"), f"  ({report.format})"))
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim", overflow="fold")
    summary.add_column(overflow="fold")

    def row(label: str, value: str) -> None:
        summary.add_row(Text(label), Text(value))

    where = report.container_subscripts or "top level"
    row("state dict", where)
    row(
        "tensors",
        f"{report.tensors} tensors, {human_count(report.parameters)} parameters, "
        f"{human_bytes(report.total_bytes)}",
    )
    for d in report.dtypes:
        row(
            f"  {d.dtype}",
            f"{d.tensors} tensors, {human_count(d.parameters)} params, {human_bytes(d.bytes)}",
        )
    f = report.facts
    model = ", ".join(
        f"{k} {v}"
        for k, v in (
            ("dim", f.dim),
            ("layers", f.n_layers),
            ("heads", f.n_heads),
            ("vocab", f.vocab_size),
            ("ffn", f.ffn_hidden),
        )
        if v is not None
    )
    row("model", model or "unknown")
    if report.adapter is None:
        row("adapter", "none found")
    else:
        a = report.adapter
        prompt = (
            f"adapter_len {a.adapter_len}, adapter_layer {a.adapter_layer} (from {a.source})"
            if a.has_prompt
            else "no prompt"
        )
        row(
            "adapter",
            f"{a.family.name}: {prompt}, {len(a.keys)} tensors, "
            f"{human_bytes(report.adapter_bytes)}"
            + ("" if a.family.runs_here else f"; the reference model does not run it: "
               f"{a.family.refusal}"),
        )  # fmt: skip
    if report.prefix:
        row("key prefix", report.prefix)
    for key, entry in report.entries.items():
        row(f"entry {key}", entry.summary)
    if report.args:
        shown = {k: report.args[k] for k in list(report.args)[:12]}
        row("args", ", ".join(f"{k}={v!r}" for k, v in shown.items()))
    row(
        "values scanned",
        f"{report.scanned_tensors} tensors, {human_bytes(report.scanned_bytes)}"
        + ("" if report.scanned_tensors == report.tensors else " (adapter only; --deep: all)"),
    )
    if report.diff is not None:
        counts = ", ".join(f"{v} {k}" for k, v in report.diff.counts.items() if v)
        row("vs base", f"{report.base_path}: {counts}")
    for note in report.notes:
        row("note", note)
    out.print(summary)
    if report.gates:
        out.print(gates_table(report))
    if report.findings:
        render_findings(report.findings)
    else:
        out.print("[green]no findings[/]")


def gates_table(report: InspectReport) -> Table:
    family = report.adapter.family if report.adapter is not None else None
    table = Table(title=f"Adapter gates (adapted layers; {describe(family)})", title_justify="left")
    # tanh(g) is shown where some run applies it (v1 training, v2 always), not for raw gates.
    tanh = (
        family is None
        or family.gate is None
        or "tanh" in (family.gate.trained, family.gate.inference)
    )
    columns = ("layer", "j", "shape", "g per head", *(("tanh(g) per head",) * tanh), "max|g|")
    for col in columns:
        table.add_column(col, justify="right" if col in ("layer", "j", "max|g|") else "left")
    for r in report.gates:
        table.add_row(
            str(r.layer),
            "" if r.prompt_index is None else str(r.prompt_index),
            str(list(r.shape)),
            " ".join(f"{v:+.3f}" for v in r.g),
            *((" ".join(f"{v:+.3f}" for v in r.tanh_g),) * tanh),
            f"{max((abs(v) for v in r.g), default=0):.3f}",
        )
    return table


def render_diff(report: DiffReport, *, show_all: bool = False) -> None:
    counts = ", ".join(f"{v} {k}" for k, v in report.counts.items() if v)
    out.print(f"[bold]diff[/]: {len(report.tensors)} tensors: {counts}")
    shown = [t for t in report.tensors if show_all or t.status != "identical"]
    table = Table(title="Tensors" + ("" if show_all else " (not identical)"), title_justify="left")
    for col in ("name", "status", "shape", "dtype", "max |Δ|", "rel L2", "adapter"):
        table.add_column(col, justify="right" if col in ("max |Δ|", "rel L2") else "left")
    for t in shown:
        shape = list(t.shape or t.base_shape or ())
        if t.status == "shape_changed":
            shape_text = f"{list(t.base_shape or ())} -> {list(t.shape or ())}"
        else:
            shape_text = str(shape)
        dtype = t.dtype or t.base_dtype or ""
        if t.recast:
            dtype = f"{t.base_dtype} -> {t.dtype}"
        table.add_row(
            Text(t.name),
            Text(t.status, STATUS_STYLE[t.status]),
            Text(shape_text),
            Text(dtype),
            "" if t.max_abs is None else f"{t.max_abs:.4g}",
            "" if t.rel_l2 is None else f"{t.rel_l2:.3e}",
            "adapter" if t.is_adapter else "",
        )
    if shown:  # every tensor identical: the counts above say it all
        _print_names_table(table)
    layers = Table(title="Per layer", title_justify="left")
    layers.add_column("layer", justify="right")
    statuses = [s for s, v in report.counts.items() if v]
    for s in statuses:
        layers.add_column(s, justify="right")
    for r in report.per_layer():
        layers.add_row(
            "global" if r.layer is None else str(r.layer),
            *(str(r.counts.get(s, "")) for s in statuses),
        )
    out.print(layers)
    adapter = report.adapter
    if adapter:
        names = ", ".join(t.name for t in adapter[:8]) + (" ..." if len(adapter) > 8 else "")
        out.print(Text.assemble(("adapter tensors", "green"), f" ({len(adapter)}): {names}"))


# A colour for each of generate.OUTCOMES (the tables iterate those; generate imports torch, so
# it is imported where outcomes are shown: smoke and diagnose have torch loaded already).
OUTCOME_STYLE = {"eos": "green", "loop": "bold red", "max_tokens": "yellow", "nonfinite": "red"}


def render_smoke(report: SmokeReport) -> None:
    from ckpt_doctor.generate import OUTCOMES

    load = report.load
    matched = f"{len(load.from_file)} of {load.model_keys} model keys from the file"
    out.print(
        Text.assemble(
            ("smoke-generate", "bold"),
            f": {load.source}, load as {load.mode} ({matched}), {load.dtype} on "
            f"{report.device}, gate {load.gate_fn}, attention {report.attention}"
            + (", CUDA graph" if report.cuda_graph else ""),
        )
    )
    table = Table(show_lines=True, expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    for col in ("outcome", "tokens", "loop at, period", "max P(eos)"):
        table.add_column(col, no_wrap=True)
    table.add_column("text (repeating part underlined)", ratio=3, overflow="fold")
    for r in report.results:
        loop = f"{r.loop.start}, {r.loop.period}" if r.loop else ""
        table.add_row(
            Text(r.prompt),
            Text(r.outcome, OUTCOME_STYLE[r.outcome]),
            str(len(r.generated_ids)),
            loop,
            f"{r.max_eos_prob:.3f}",
            _marked_text(r),
        )
    out.print(table)
    counts = {o: sum(r.outcome == o for r in report.results) for o in OUTCOMES}
    out.print(", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if report.findings:
        render_findings(report.findings)


def _marked_text(r: Result) -> Text:
    """The generation, with the repeating part (from the loop's start) marked."""
    text = r.text.replace("\n", "⏎")  # same length: loop_char still indexes it
    if r.loop_char is None:
        return Text(text)
    return Text(text[: r.loop_char]) + Text(text[r.loop_char :], "red underline")


def render_extraction(result: Extraction) -> None:
    a = result.adapter
    saved = result.input_bytes - result.output_bytes
    # An adapter of a tiny model can outweigh a zip full of small tensors: say so, not "-141 B".
    size = f"{human_bytes(abs(saved))} {'smaller' if saved >= 0 else 'larger'} than the input"
    out.print(
        Text.assemble(
            ("extracted", "bold"),
            f" {len(result.taken)} tensors from {result.source} -> ",
            (str(result.output), "green"),
            f" ({result.format}, {human_bytes(result.output_bytes)}; {size})",
        )
    )
    out.print(
        Text(
            f"adapter: {a.family.name}, adapter_len {a.adapter_len}, adapter_layer "
            f"{a.adapter_layer} (from {a.source}); left behind: {len(result.left)} tensors"
        )
    )
    reasons: dict[str, list[str]] = {}
    for name, why in result.taken.items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        out.print(Text(f"  taken ({why}): {shown}"))
    if result.findings:
        render_findings(result.findings)


def render_conversion(result: Conversion) -> None:
    out.print(
        Text.assemble(
            ("converted", "bold"),
            f" {result.source} ({result.source_family}) -> ",
            (str(result.output), "green"),
            f" ({result.target_family}, {len(result.tensors)} tensors)",
        )
    )
    for note in result.notes:
        out.print(Text(f"  {note}"))
    if result.max_logit_diff is not None:
        same = (
            "identical" if result.max_logit_diff == 0 else f"max |diff| {result.max_logit_diff:.3g}"
        )
        out.print(Text(f"  logits of source and output on the base: {same}"))
    if result.findings:
        render_findings(result.findings)


def render_verify(report: VerifyReport) -> None:
    for c in report.checks:
        if c.skipped:
            mark = Text("skip", "dim")
        else:
            mark = Text("pass", "green") if c.passed else Text("FAIL", "bold red")
        out.print(Text.assemble(mark, f"  {c.name:<12} {c.detail}"))
    out.print("[green]verified[/]" if report.passed else "[bold red]verification failed[/]")
    if report.findings:
        render_findings(report.findings)


def render_repair(report: RepairReport) -> None:
    if report.output is None:
        out.print(Text(f"nothing to repair in {report.source}; nothing written"))
        if report.findings:
            render_findings(report.findings)
        return
    out.print(
        Text.assemble(("repaired", "bold"), f" {report.source} -> ", (str(report.output), "green"))
    )
    for c in report.changes:
        names = f": {', '.join(c.tensors[:4])}" + (" ..." if len(c.tensors) > 4 else "")
        out.print(Text(f"  {c.kind:<16} {c.detail}{names if c.tensors else ''}"))
    if report.findings:
        render_findings(report.findings)


def render_diagnosis(d: Diagnosis) -> None:
    from ckpt_doctor.generate import OUTCOMES

    if d.findings:
        render_findings(d.findings)
    if d.arms:
        table = Table(title="A/B smoke run", title_justify="left")
        for col in ("arm", "keys loaded", *OUTCOMES, "note"):
            table.add_column(col, overflow="fold")
        for arm in d.arms:
            table.add_row(
                Text(arm.name),
                "" if arm.matched is None else str(arm.matched),
                *(str(arm.outcomes.get(o, 0)) for o in OUTCOMES),
                Text(arm.error or ""),
            )
        out.print(table)
    style = "bold red" if d.root_cause else "green"
    out.print(Text.assemble((f"root cause: {d.root_cause or 'none'}", style), f"  {d.verdict}"))
    if d.fix:
        # A command to copy: one line however narrow the terminal, never hard-wrapped.
        out.print(Text.assemble(("fix:", "bold"), f" {d.fix}"), soft_wrap=True)


def render_demo(result: DemoResult) -> None:
    def step(title: str) -> None:
        out.rule(Text(title, "bold"), align="left")

    w = result.world
    step(f"1. The symptom: {w.name}/checkpoint-4.pth loaded as upstream example.py does")
    render_smoke(result.before)
    step("2. ckpt-doctor diagnose")
    render_diagnosis(result.diagnosis)
    step("3. ckpt-doctor extract")
    render_extraction(result.extraction)
    step("4. ckpt-doctor verify")
    render_verify(result.verification)
    step("5. The cure: base + extracted adapter")
    render_smoke(result.after)
    if result.story_holds:
        out.print("[bold green]eos is back: the adapter was never loaded, now it is.[/]")
    else:
        out.print("[bold red]the demo story did not hold on this machine (see above)[/]")
