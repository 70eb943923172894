"""The only module that imports rich: tables for people on stdout, progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ckpt_doctor.diffing import DiffReport
from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.findings import Finding
from ckpt_doctor.inspection import InspectReport
from ckpt_doctor.units import human_bytes, human_count

if TYPE_CHECKING:  # these import torch, which inspect and diff must never pay for
    from ckpt_doctor.demo import DemoResult
    from ckpt_doctor.diagnosis import Diagnosis
    from ckpt_doctor.extraction import Extraction
    from ckpt_doctor.generate import Result
    from ckpt_doctor.repair import RepairReport
    from ckpt_doctor.smoke import SmokeReport
    from ckpt_doctor.verification import VerifyReport

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
STATUS_STYLE = {
    "added": "green",
    "removed": "red",
    "modified": "yellow",
    "identical": "dim",
    "shape_changed": "bold red",
    "dtype_changed": "magenta",
}


def print_json(doc: dict[str, Any]) -> None:
    """Exactly one JSON document on stdout, nothing else there."""
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def error_line(exc: CkptDoctorError) -> None:
    hint = f" [dim]hint: {exc.hint}[/dim]" if exc.hint else ""
    err.print(f"[bold red]error[/] [{exc.code}] {_escape(exc.message)}{hint}")


def error_json(exc: CkptDoctorError) -> dict[str, Any]:
    return {
        "error": {"id": exc.code, "message": exc.message, "hint": exc.hint},
        "findings": [
            {"id": exc.code, "severity": "error", "message": exc.message, "hint": exc.hint}
        ],
    }


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


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
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{description} {name}")

        yield update


def render_findings(findings: list[Finding]) -> None:
    """One row per finding: severity and id, the evidence, then what to do."""
    grid = Table.grid(padding=(0, 1, 1, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    for f in findings:
        style = SEVERITY_STYLE[f.severity]
        body = Text(f.message)
        body.append(f"\n-> {f.hint}", style="dim")
        grid.add_row(Text(f.severity, style), Text(f.id, style), body)
    out.print("[bold]Findings[/]")
    out.print(grid)


def render_inspect(report: InspectReport) -> None:
    title = f"[bold]{report.path}[/]  ({report.format})"
    out.print(title)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column()
    where = "".join(f"[{k!r}]" for k in report.container_path) or "top level"
    summary.add_row("state dict", _escape(where))
    summary.add_row(
        "tensors",
        f"{report.tensors} tensors, {human_count(report.parameters)} parameters, "
        f"{human_bytes(report.total_bytes)}",
    )
    for row in report.dtypes:
        summary.add_row(
            f"  {row.dtype}",
            f"{row.tensors} tensors, {human_count(row.parameters)} params, "
            f"{human_bytes(row.bytes)}",
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
    summary.add_row("model", model or "unknown")
    if report.adapter is None:
        summary.add_row("adapter", "none found")
    else:
        a = report.adapter
        summary.add_row(
            "adapter",
            f"{a.family.name}: adapter_len {a.adapter_len}, adapter_layer {a.adapter_layer} "
            f"(from {a.source}), {len(a.keys)} tensors, {human_bytes(report.adapter_bytes)}",
        )
    if report.prefix:
        summary.add_row("key prefix", report.prefix)
    for key, entry in report.entries.items():
        summary.add_row(f"entry {key}", _escape(entry.summary))
    if report.args:
        shown = {k: report.args[k] for k in list(report.args)[:12]}
        summary.add_row("args", _escape(", ".join(f"{k}={v!r}" for k, v in shown.items())))
    summary.add_row(
        "values scanned",
        f"{report.scanned_tensors} tensors, {human_bytes(report.scanned_bytes)}"
        + ("" if report.scanned_tensors == report.tensors else " (adapter only; --deep: all)"),
    )
    if report.diff is not None:
        counts = ", ".join(f"{v} {k}" for k, v in report.diff.counts.items() if v)
        summary.add_row("vs base", f"{report.base_path}: {counts}")
    for note in report.notes:
        summary.add_row("note", _escape(note))
    out.print(summary)
    if report.gates:
        out.print(gates_table(report))
    if report.findings:
        render_findings(report.findings)
    else:
        out.print("[green]no findings[/]")


def gates_table(report: InspectReport) -> Table:
    table = Table(
        title="Adapter gates (adapted layers; G = g at raw inference, tanh(g) in training)",
        title_justify="left",
    )
    for col in ("layer", "j", "shape", "g per head", "tanh(g) per head", "max|g|"):
        table.add_column(col, justify="right" if col in ("layer", "j", "max|g|") else "left")
    for r in report.gates:
        table.add_row(
            str(r.layer),
            "" if r.prompt_index is None else str(r.prompt_index),
            str(list(r.shape)),
            " ".join(f"{v:+.3f}" for v in r.g),
            " ".join(f"{v:+.3f}" for v in r.tanh_g),
            f"{max((abs(v) for v in r.g), default=0):.3f}",
        )
    return table


def render_diff(report: DiffReport, *, show_all: bool = False) -> None:
    counts = ", ".join(f"{v} {k}" for k, v in report.counts.items() if v)
    out.print(f"[bold]diff[/]: {len(report.tensors)} tensors: {counts}")
    table = Table(title="Tensors" + ("" if show_all else " (not identical)"), title_justify="left")
    for col in ("name", "status", "shape", "dtype", "max |Δ|", "rel L2", "adapter"):
        table.add_column(col, justify="right" if col in ("max |Δ|", "rel L2") else "left")
    for t in report.tensors:
        if t.status == "identical" and not show_all:
            continue
        shape = list(t.shape or t.base_shape or ())
        if t.status == "shape_changed":
            shape_text = f"{list(t.base_shape or ())} -> {list(t.shape or ())}"
        else:
            shape_text = str(shape)
        dtype = t.dtype or t.base_dtype or ""
        if t.status == "dtype_changed":
            dtype = f"{t.base_dtype} -> {t.dtype}"
        table.add_row(
            t.name,
            Text(t.status, STATUS_STYLE[t.status]),
            shape_text,
            dtype,
            "" if t.max_abs is None else f"{t.max_abs:.4g}",
            "" if t.rel_l2 is None else f"{t.rel_l2:.3e}",
            "adapter" if t.is_adapter else "",
        )
    out.print(table)
    layers = Table(title="Per layer", title_justify="left")
    layers.add_column("layer", justify="right")
    statuses = [s for s, v in report.counts.items() if v]
    for s in statuses:
        layers.add_column(s, justify="right")
    for row in report.per_layer():
        layers.add_row(
            "global" if row.layer is None else str(row.layer),
            *(str(row.counts.get(s, "")) for s in statuses),
        )
    out.print(layers)
    adapter = report.adapter
    if adapter:
        names = ", ".join(t.name for t in adapter[:8]) + (" ..." if len(adapter) > 8 else "")
        out.print(f"[green]adapter tensors[/] ({len(adapter)}): {names}")


OUTCOME_STYLE = {"eos": "green", "loop": "bold red", "max_tokens": "yellow", "nonfinite": "red"}


def render_smoke(report: SmokeReport) -> None:
    load = report.load
    matched = f"{len(load.from_file)} of {load.model_keys} model keys from the file"
    out.print(
        f"[bold]smoke-generate[/]: {_escape(load.source)}, load as {load.mode} ({matched}), "
        f"{load.dtype} on {report.device}, gate {load.gate_fn}, attention {report.attention}"
        + (", CUDA graph" if report.cuda_graph else "")
    )
    table = Table(show_lines=True, expand=True)
    table.add_column("prompt", ratio=2)
    for col in ("outcome", "tokens", "loop at, period", "max P(eos)"):
        table.add_column(col, no_wrap=True)
    table.add_column("text (repeating part underlined)", ratio=3)
    for r in report.results:
        loop = f"{r.loop.start}, {r.loop.period}" if r.loop else ""
        table.add_row(
            r.prompt,
            Text(r.outcome, OUTCOME_STYLE[r.outcome]),
            str(len(r.generated_ids)),
            loop,
            f"{r.max_eos_prob:.3f}",
            _marked_text(r),
        )
    out.print(table)
    counts = {o: sum(r.outcome == o for r in report.results) for o in OUTCOME_STYLE}
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
    out.print(
        f"[bold]extracted[/] {len(result.taken)} tensors from {_escape(str(result.source))} "
        f"-> [green]{_escape(str(result.output))}[/] ({result.format}, "
        f"{human_bytes(result.output_bytes)}; {human_bytes(saved)} smaller than the input)"
    )
    out.print(
        f"adapter: {a.family.name}, adapter_len {a.adapter_len}, adapter_layer "
        f"{a.adapter_layer} (from {a.source}); left behind: {len(result.left)} tensors"
    )
    reasons: dict[str, list[str]] = {}
    for name, why in result.taken.items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        out.print(f"  taken ({why}): {shown}")
    if result.findings:
        render_findings(result.findings)


def render_verify(report: VerifyReport) -> None:
    for c in report.checks:
        mark = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        out.print(f"{mark}  {c.name:<12} {_escape(c.detail)}")
    out.print("[green]verified[/]" if report.passed else "[bold red]verification failed[/]")
    if report.findings:
        render_findings(report.findings)


def render_repair(report: RepairReport) -> None:
    if report.output is None:
        out.print(f"nothing to repair in {_escape(str(report.source))}; nothing written")
        if report.findings:
            render_findings(report.findings)
        return
    out.print(f"[bold]repaired[/] {_escape(str(report.source))} -> [green]{report.output}[/]")
    for c in report.changes:
        names = f": {', '.join(c.tensors[:4])}" + (" ..." if len(c.tensors) > 4 else "")
        out.print(f"  {c.kind:<16} {_escape(c.detail)}{names if c.tensors else ''}")
    if report.findings:
        render_findings(report.findings)


def render_diagnosis(d: Diagnosis) -> None:
    if d.findings:
        render_findings(d.findings)
    if d.arms:
        table = Table(title="A/B smoke run", title_justify="left")
        for col in ("arm", "keys loaded", "eos", "loop", "max_tokens", "note"):
            table.add_column(col)
        for arm in d.arms:
            table.add_row(
                arm.name,
                "" if arm.matched is None else str(arm.matched),
                *(str(arm.outcomes.get(o, 0)) for o in ("eos", "loop", "max_tokens")),
                _escape(arm.error or ""),
            )
        out.print(table)
    style = "bold red" if d.root_cause else "green"
    out.print(f"[{style}]root cause: {d.root_cause or 'none'}[/]  {_escape(d.verdict)}")
    if d.fix:
        out.print(f"[bold]fix:[/] {_escape(d.fix)}")


def render_demo(result: DemoResult) -> None:
    def step(title: str) -> None:
        out.rule(f"[bold]{title}[/]", align="left")

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
