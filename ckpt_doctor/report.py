"""``--report FILE``: a diagnose or smoke-generate run as a file to attach to a bug report.

``.md`` is GitHub-flavoured Markdown: the verdict, the fix command, the findings, the A/B table
and every generation with its repeating part in bold. ``.html`` is one self-contained page (no
script, no network, styles inline) with the same content, plus P(eos) at each generated step as
an SVG chart per arm and the adapter gates as a layer x head SVG heat map. Both are built from
the run's result objects; nothing here runs a model.
"""

from __future__ import annotations

import html
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_doctor import __version__
from ckpt_doctor.atomic import check_destination, write_atomically
from ckpt_doctor.errors import UsageError
from ckpt_doctor.findings import Finding
from ckpt_doctor.output import outcome_counts

if TYPE_CHECKING:
    from ckpt_doctor.diagnosis import Diagnosis
    from ckpt_doctor.generate import Result
    from ckpt_doctor.smoke import SmokeReport

SUFFIXES = (".md", ".html")
OUTCOME_COLUMNS = ("eos", "loop", "max_tokens", "nonfinite")
# One colour per prompt line in the P(eos) charts (cycled).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


@dataclass
class ArmView:
    """One generation run as a report shows it: a diagnose arm, or the smoke-generate run."""

    name: str
    results: list[Result]
    keys_loaded: int | None = None
    note: str = ""


@dataclass
class ReportView:
    """What both formats show, taken from a Diagnosis or a SmokeReport."""

    title: str
    summary: list[str]
    fix: str | None
    findings: list[Finding]
    arms: list[ArmView]
    gates: dict[int, list[float]] = field(default_factory=dict)  # layer -> g per head
    gates_note: str = ""
    command: str = ""


def check_report_path(path: Path | None, *, inputs: list[Path]) -> None:
    """Before anything runs: a known suffix, a directory that exists, not an input file."""
    if path is None:
        return
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(
            f"--report {path}: unknown report format {path.suffix or '(no suffix)'!r}",
            hint="name it *.md (Markdown for GitHub) or *.html (a self-contained page)",
        )
    check_destination(path, force=True, sources=inputs)  # a report is rewritten on a rerun


def write_report(path: Path | None, result: Diagnosis | SmokeReport) -> None:
    if path is None:
        return
    view = view_of(result)
    text = html_report(view) if path.suffix.lower() == ".html" else markdown_report(view)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def view_of(result: Diagnosis | SmokeReport) -> ReportView:
    from ckpt_doctor.diagnosis import Diagnosis

    command = " ".join(shlex.quote(a) for a in ["ckpt-doctor", *sys.argv[1:]])
    if isinstance(result, Diagnosis):
        d = result
        summary = [f"root cause: {d.root_cause or 'none'}", d.verdict]
        arms = [
            ArmView(a.name, a.results, a.matched, a.error or "")
            for a in d.arms
            if a.results or a.error
        ]
        gates = {r.layer: r.g for r in d.gates}
        note = "the file's gates (g, as stored; raw inference uses G = g)"
        return ReportView(
            f"ckpt-doctor diagnose {d.path}", summary, d.fix, d.findings, arms, gates, note,
            command,
        )  # fmt: skip
    s = result
    load = s.load
    summary = [
        f"{load.source}, load as {load.mode} ({len(load.from_file)} of {load.model_keys} model "
        f"keys from the file), {load.dtype} on {s.device}, gate {load.gate_fn}, attention "
        f"{s.attention}",
        outcome_counts(s.results),
    ]
    arm = ArmView(f"load as {load.mode}", s.results, len(load.from_file))
    note = f"the gates the run used (g as loaded; G = {load.gate_fn}(g))"
    return ReportView(
        "ckpt-doctor smoke-generate", summary, None, s.findings, [arm], s.gates, note, command
    )


# --------------------------------------------------------------------------- Markdown

_MD_RESERVED = re.compile(r"([\\`*_\[\]<>|~#])")


def md_escape(text: str) -> str:
    """Text as Markdown shows it literally, on one line (a table cell): newlines as ⏎."""
    return _MD_RESERVED.sub(r"\\\1", text.replace("&", "&amp;")).replace("\n", "⏎")


def _md_id(m: re.Match[str]) -> str:
    return f"`{m.group(1).replace(chr(92), '')}`"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GFM table; cells are escaped already (md_escape) or plain numbers."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def md_marked(r: Result) -> str:
    """The generation with the repeating part (from the loop's start) in bold."""
    if r.loop_char is None or not r.text[r.loop_char :].strip():
        return md_escape(r.text)
    head, loop = r.text[: r.loop_char], r.text[r.loop_char :]
    # Bold cannot start or end on a space: keep the blanks outside the markers.
    lead = len(loop) - len(loop.lstrip())
    trail = len(loop) - len(loop.rstrip())
    core = loop[lead : len(loop) - trail]
    return (
        md_escape(head + loop[:lead])
        + f"**{md_escape(core)}**"
        + md_escape(loop[len(loop) - trail :])
    )


def markdown_report(v: ReportView) -> str:
    out = [f"# {md_escape(v.title)}", ""]
    out += [f"ckpt-doctor {__version__}; command:", "", "```", v.command, "```", ""]
    # Catalogue ids ([A-Z_]) go in code spans: nothing in them needs escaping.
    out += [
        "- " + re.sub(r"\\?\b([A-Z][A-Z0-9]*(?:\\?_[A-Z0-9]+)+)\b", _md_id, md_escape(line))
        for line in v.summary
        if line
    ]
    if v.fix:
        out += ["", "Fix:", "", "```", v.fix, "```"]
    out += ["", "## Findings", ""]
    if v.findings:
        rows = [[f.severity, f.id, md_escape(f.message), md_escape(f.hint)] for f in v.findings]
        out.append(md_table(["severity", "id", "message", "hint"], rows))
    else:
        out.append("none")
    out += ["", "## Smoke runs", ""]
    out.append(md_table(["arm", "keys loaded", *OUTCOME_COLUMNS, "note"], _arm_rows(v)))
    out += ["", "## Generations", "", "The repeating part of a looping generation is in bold.", ""]
    rows = [
        [md_escape(r.prompt), md_escape(arm), r.outcome, str(len(r.generated_ids)),
         f"{r.max_eos_prob:.3f}", md_marked(r)]
        for arm, r in _by_prompt(v)
    ]  # fmt: skip
    out.append(md_table(["prompt", "arm", "outcome", "tokens", "max P(eos)", "text"], rows))
    return "\n".join(out) + "\n"


def _arm_rows(v: ReportView) -> list[list[str]]:
    rows = []
    for a in v.arms:
        counts = [str(sum(r.outcome == o for r in a.results)) for o in OUTCOME_COLUMNS]
        keys = "" if a.keys_loaded is None else str(a.keys_loaded)
        rows.append([md_escape(a.name), keys, *counts, md_escape(a.note)])
    return rows


def _by_prompt(v: ReportView) -> list[tuple[str, Result]]:
    """(arm name, result) grouped by prompt: every arm's answer to a prompt side by side."""
    n = max((len(a.results) for a in v.arms), default=0)
    return [(a.name, a.results[i]) for i in range(n) for a in v.arms if i < len(a.results)]


# --------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
pre, code { background: #f6f6f6; padding: 0.2em 0.4em; }
.error { color: #b00020; font-weight: bold; } .warning { color: #9a6700; } .info { color: #0b6e99; }
.loop { text-decoration: underline; color: #b00020; }
.eos { color: #1a7f37; } .max_tokens { color: #9a6700; } .nonfinite { color: #b00020; }
figure { margin: 0 0 1.5em; } figcaption { font-size: 0.9em; color: #555; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escaped)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_marked(r: Result) -> str:
    text = r.text
    if r.loop_char is None:
        return _e(text).replace("\n", "⏎")
    head, loop = _e(text[: r.loop_char]), _e(text[r.loop_char :])
    return (head + f'<span class="loop">{loop}</span>').replace("\n", "⏎")


def html_report(v: ReportView) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>{_e(v.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(v.title)}</h1>",
        f"<p>ckpt-doctor {_e(__version__)}; command: <code>{_e(v.command)}</code></p>",
        "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in v.summary if line) + "</ul>",
    ]
    if v.fix:
        parts.append(f"<p>Fix:</p><pre>{_e(v.fix)}</pre>")
    parts.append("<h2>Findings</h2>")
    if v.findings:
        rows = [
            [f'<span class="{f.severity}">{_e(f.severity)}</span>', _e(f.id), _e(f.message),
             _e(f.hint)]
            for f in v.findings
        ]  # fmt: skip
        parts.append(_html_table(["severity", "id", "message", "hint"], rows))
    else:
        parts.append("<p>none</p>")
    parts.append("<h2>Smoke runs</h2>")
    rows = [[_e(c.replace("\\", "")) for c in row] for row in _arm_rows(v)]
    parts.append(_html_table(["arm", "keys loaded", *OUTCOME_COLUMNS, "note"], rows))
    parts.append("<h2>P(eos) at each generated step</h2>")
    parts += [eos_chart(a) for a in v.arms if a.results]
    parts.append("<h2>Adapter gates</h2>")
    parts.append(gate_heatmap(v.gates, v.gates_note))
    parts.append(
        "<h2>Generations</h2><p>The repeating part of a looping generation is underlined.</p>"
    )
    rows = [
        [_e(r.prompt), _e(arm), f'<span class="{r.outcome}">{_e(r.outcome)}</span>',
         str(len(r.generated_ids)), f"{r.max_eos_prob:.3f}", html_marked(r)]
        for arm, r in _by_prompt(v)
    ]  # fmt: skip
    parts.append(_html_table(["prompt", "arm", "outcome", "tokens", "max P(eos)", "text"], rows))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def eos_chart(arm: ArmView, *, width: int = 640, height: int = 220) -> str:
    """P(eos) per generated step, one line per prompt, as an inline SVG (y from 0 to 1)."""
    left, right, top, bottom = 44, 12, 12, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    steps = max((len(r.eos_probs) for r in arm.results), default=0)
    span = max(steps - 1, 1)

    def xy(step: int, p: float) -> str:
        p = p if math.isfinite(p) else 0.0
        return f"{left + plot_w * step / span:.1f},{top + plot_h * (1 - p):.1f}"

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="eos-chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f"<title>P(eos) per step: {_e(arm.name)}</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
    ]
    for p in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - p)
        svg.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{p:g}</text>'
        )
    svg.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" font-size="11" '
        f'text-anchor="middle">generated step (0 to {max(steps - 1, 0)})</text>'
    )
    for k, r in enumerate(arm.results):
        if not r.eos_probs:
            continue
        colour = PALETTE[k % len(PALETTE)]
        points = " ".join(xy(i, p) for i, p in enumerate(r.eos_probs))
        svg.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}">'
            f"<title>{_e(r.prompt)}: {_e(r.outcome)}</title></polyline>"
        )
    svg.append("</svg>")
    legend = "; ".join(
        f'<span style="color:{PALETTE[k % len(PALETTE)]}">&#9632;</span> {_e(r.prompt)} '
        f"({_e(r.outcome)})"
        for k, r in enumerate(arm.results)
    )
    return f"<figure>{''.join(svg)}<figcaption>{_e(arm.name)}: {legend}</figcaption></figure>"


def gate_heatmap(gates: dict[int, list[float]], note: str, *, cell: int = 36) -> str:
    """Layer x head gate values as an inline SVG heat map: blue below 0, red above, white 0;
    the colour scale runs to the largest |g|."""
    if not gates:
        return "<p>no adapter gates in this run</p>"
    layers = sorted(gates)
    heads = max(len(g) for g in gates.values())
    finite = [abs(x) for g in gates.values() for x in g if math.isfinite(x)]
    scale = max(finite, default=0.0) or 1.0
    left, top = 70, 24
    width, height = left + cell * heads + 10, top + cell * len(layers) + 10
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gate-heatmap" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        "<title>adapter gates: layer x head</title>",
    ]
    for h in range(heads):
        x = left + cell * h + cell / 2
        svg.append(
            f'<text x="{x:.1f}" y="{top - 8}" font-size="11" text-anchor="middle">h{h}</text>'
        )
    for row, layer in enumerate(layers):
        y = top + cell * row
        svg.append(
            f'<text x="{left - 6}" y="{y + cell / 2 + 4:.1f}" font-size="11" '
            f'text-anchor="end">layer {layer}</text>'
        )
        for h, g in enumerate(gates[layer]):
            fill = _diverging(g / scale if math.isfinite(g) else math.nan)
            svg.append(
                f'<rect x="{left + cell * h}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{fill}" stroke="#fff"><title>layer {layer}, head {h}: g = {g:.4g}'
                "</title></rect>"
            )
    svg.append("</svg>")
    return (
        f"<figure>{''.join(svg)}<figcaption>{_e(note)}; colour scale: |g| up to "
        f"{scale:.3g} (blue negative, red positive)</figcaption></figure>"
    )


def _diverging(t: float) -> str:
    """-1 -> blue, 0 -> white, +1 -> red; NaN grey."""
    if not math.isfinite(t):
        return "#888888"
    t = max(-1.0, min(1.0, t))
    fade = round(255 * (1 - abs(t)))
    return f"#ff{fade:02x}{fade:02x}" if t >= 0 else f"#{fade:02x}{fade:02x}ff"
