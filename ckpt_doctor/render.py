"""The only module that imports rich: tables for people on stdout, progress on stderr.

Everything that comes from the user or the data (paths, prompts, generated text, tensor and
key names, messages, hints, exception text) goes in as rich ``Text`` or through ``escape``:
rich markup would otherwise eat or choke on its square brackets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ckpt_doctor.diffing import DiffReport
from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.families import describe
from ckpt_doctor.findings import Finding
from ckpt_doctor.inspection import InspectReport

# The JSON document and the one-line summaries are plain text; cli.py and tests call them here.
from ckpt_doctor.output import (  # noqa: F401  (re-exported)
    Unpadded,
    adapter_words,
    demo_summary,
    error_json,
    json_safe,
    lora_summary,
    outcome_counts,
    print_json,
    quiet_line,
)
from ckpt_doctor.progress import Progress as ProgressFn
from ckpt_doctor.units import human_bytes, human_count

if TYPE_CHECKING:  # these import torch, which inspect and diff must never pay for
    from ckpt_doctor.convert import Conversion
    from ckpt_doctor.extraction import Extraction
    from ckpt_doctor.repair import RepairReport
    from ckpt_doctor.verification import VerifyReport


_STDOUT = Unpadded()
# No highlighting and no :emoji: codes: paths and names are printed as they are.
out = Console(file=_STDOUT, highlight=False, emoji=False)
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_line(exc: CkptDoctorError, *, source: str = "") -> None:
    """One stderr line: never hard-wrapped (soft_wrap), never read as markup (Text). ``source``
    names the process it came from when several ran ("rank 1")."""
    where = f"{source}: " if source else ""
    line = Text.assemble(("error", "bold red"), f" [{exc.code}] {where}{_one_line(exc.message)}")
    if exc.hint:
        line.append(f" hint: {_one_line(exc.hint)}", style="dim")
    err.print(line, soft_wrap=True)


def status_line(message: str) -> None:
    """A plain one-line note on stderr ("interrupted")."""
    err.print(Text(message), soft_wrap=True)


class _Count(ProgressColumn):
    """done / total in the step's unit: bytes in KiB / MiB / GiB, tokens and steps as counts."""

    def render(self, task: Any) -> Text:
        unit, done, total = task.fields.get("unit", ""), int(task.completed), task.total
        if unit == "bytes":
            text = human_bytes(done) + ("" if total is None else f" / {human_bytes(total)}")
        else:
            text = f"{done}" + ("" if total is None else f"/{int(total)}") + f" {unit}"
        return Text(text, "progress.download")


@contextmanager
def progress_view(*, enabled: bool) -> Iterator[ProgressFn | None]:
    """A transient progress line on stderr; yields the callback the library calls, or None
    when ``enabled`` is False (no terminal, --quiet). A new task name is drawn at once, so
    every step shows up however fast it is."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), _Count())
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("", total=None, unit="")
        shown = [""]

        def update(name: str, done: int, total: int | None, unit: str) -> None:
            bar.update(task, description=name, completed=done, total=total, unit=unit)
            if name != shown[0]:
                shown[0] = name
                bar.refresh()

        yield update


def _print_names_table(table: Table) -> None:
    """Print a table of tensor names at the width it needs. Narrower, rich shrinks the widest
    column first, and that is the name: cut with an ellipsis or folded mid-word. A line wider
    than the terminal wraps there but loses nothing, and a pipe gets one row per line."""
    needed = Measurement.get(out, out.options.update_width(100_000), table).maximum
    if needed <= out.width:
        out.print(table)
        return
    Console(file=_STDOUT, highlight=False, emoji=False, width=needed).print(table)


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
    sizes = zip(("dim", "layers", "heads", "vocab", "ffn"), (f.dim, f.n_layers, f.n_heads,
                f.vocab_size, f.ffn_hidden), strict=True)  # fmt: skip
    row("model", ", ".join(f"{k} {v}" for k, v in sizes if v is not None) or "unknown")
    if report.adapter is None:
        row("adapter", "none found")
    else:
        a = report.adapter
        prompt = (
            f"adapter_len {a.adapter_len}, adapter_layer {a.adapter_layer} (from {a.source})"
            if a.has_prompt
            else lora_summary(a)
            if a.lora is not None
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
    if report.tensor_list is not None:
        _tensor_list(report)
    if report.gates:
        out.print(gates_table(report))
    if report.findings:
        render_findings(report.findings)
    else:
        out.print("[green]no findings[/]")


def _tensor_list(report: InspectReport) -> None:
    rows = report.tensor_list or []
    table = Table(title=f"Tensors ({len(rows)} of {report.tensors})", title_justify="left")
    for col in ("name", "shape", "dtype", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for t in rows:
        table.add_row(Text(t.name), str(list(t.shape)), t.dtype, human_bytes(t.bytes))
    _print_names_table(table)


def gates_table(report: InspectReport) -> Table:
    family = report.adapter.family if report.adapter is not None else None
    table = Table(title=f"Adapter gates (adapted layers; {describe(family)})", title_justify="left")
    # tanh(g) is shown where some run applies it (v1 training, v2 always), not for raw gates.
    tanh = (
        family is None
        or family.gate is None
        or "tanh" in (family.gate.trained, family.gate.inference)
    )
    # prompt_index: which block of adapter_query.weight rows is this layer's prompt (as in JSON).
    columns = (
        "layer", "prompt_index", "shape", "g per head", *(("tanh(g) per head",) * tanh), "max|g|",
    )  # fmt: skip
    for col in columns:
        right = col in ("layer", "prompt_index", "max|g|")
        table.add_column(col, justify="right" if right else "left")
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


def _labelled(*rows: tuple[str | Text, str | Text]) -> None:
    """Label / value rows: a value too long for one line wraps under itself, not under the
    label, and a label never runs into its value."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    out.print(grid)


def render_extraction(result: Extraction) -> None:
    a = result.adapter
    saved = result.input_bytes - result.output_bytes
    # An adapter of a tiny model can outweigh a zip full of small tensors: say so, not "-141 B".
    size = f"{human_bytes(abs(saved))} {'smaller' if saved >= 0 else 'larger'} than the input"
    rows: list[tuple[str | Text, str | Text]] = [
        (
            Text("extracted", "bold"),
            Text.assemble(
                f"{len(result.taken)} tensors from {result.source} -> ",
                (str(result.output), "green"),
                f" ({result.format}, {human_bytes(result.output_bytes)}; {size})",
            ),
        ),
        (
            "adapter",
            f"{a.family.name}, {adapter_words(a)}; left behind: {len(result.left)} tensors",
        ),
    ]
    reasons: dict[str, list[str]] = {}
    for name, why in result.taken.items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        rows.append(("taken", f"({why}) {shown}"))
    _labelled(*rows)
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
    grid = Table.grid(padding=(0, 2, 0, 0))
    for no_wrap in (True, True, False):  # the check names never overflow their column
        grid.add_column(no_wrap=no_wrap, overflow="fold")
    marks = {"pass": ("pass", "green"), "fail": ("FAIL", "bold red"), "not run": ("skip", "dim")}
    for c in report.checks:
        grid.add_row(Text(*marks[c.status]), Text(c.name), Text(c.detail))
    out.print(grid)
    style = "bold red" if not report.passed else "yellow" if report.not_run else "green"
    out.print(Text(report.verdict, style))
    if report.findings:
        render_findings(report.findings)


def render_repair(report: RepairReport) -> None:
    if report.output is None:
        out.print(Text(f"nothing to repair in {report.source}; nothing written"))
        if report.findings:
            render_findings(report.findings)
        return
    rows: list[tuple[str | Text, str | Text]] = [
        (
            Text("repaired", "bold"),
            Text.assemble(f"{report.source} -> ", (str(report.output), "green")),
        )
    ]
    for c in report.changes:
        names = f": {', '.join(c.tensors[:4])}" + (" ..." if len(c.tensors) > 4 else "")
        rows.append((f"  {c.kind}", f"{c.detail}{names if c.tensors else ''}"))
    _labelled(*rows)
    if report.findings:
        render_findings(report.findings)


def render_quiet(report: Any) -> None:
    """--quiet: the findings and the one line that says how it ended (and the tensor list
    inspect --tensors asked for), nothing else."""
    if isinstance(report, InspectReport) and report.tensor_list is not None:
        _tensor_list(report)
    if getattr(report, "findings", None):
        render_findings(report.findings)
    line = quiet_line(report)
    if line:
        out.print(Text(line), soft_wrap=True)
