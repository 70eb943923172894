"""Rendering of the commands that run the model (smoke-generate, diagnose, demo): the
generations with their outcomes and loops marked, the A/B table, the demo's story. The same
consoles and finding tables as render.py, whose helpers it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from ckpt_doctor.output import demo_summary, keys_loaded, lora_steps, outcome_counts
from ckpt_doctor.render import (
    _labelled,
    out,
    render_extraction,
    render_findings,
    render_verify,
)

if TYPE_CHECKING:
    from ckpt_doctor.demo import DemoResult
    from ckpt_doctor.diagnosis import Diagnosis
    from ckpt_doctor.generate import Result
    from ckpt_doctor.smoke import SmokeReport


# A colour for each of generate.OUTCOMES (the tables iterate those; generate imports torch, so
# it is imported where outcomes are shown: smoke and diagnose have torch loaded already).
OUTCOME_STYLE = {"eos": "green", "loop": "bold red", "max_tokens": "yellow", "nonfinite": "red"}
# Where a loop starts in generated text, when underlining cannot show it (a pipe, a file).
LOOP_MARK = "»"


def _text_header(results: list[Result]) -> str:
    """The text column's title: it names the loop marking only when some text has a loop."""
    if not any(r.loop_char is not None for r in results):
        return "text"
    return "text (repeating part underlined)" if out.is_terminal else f"text ({LOOP_MARK} loop)"


def render_smoke(report: SmokeReport) -> None:
    load = report.load
    matched = keys_loaded(load)
    _labelled(
        (
            Text("smoke-generate:", "bold"),
            f"{load.source}, load as {load.mode} ({matched}), {load.dtype} on "
            f"{report.device}, gate {load.gate_fn}, attention {report.attention}"
            + (", CUDA graph" if report.cuda_graph else ""),
        )
    )
    table = Table(show_lines=True, expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    for col in ("outcome", "tokens", "loop at, period", "max P(eos)"):
        table.add_column(col, no_wrap=True)
    table.add_column(_text_header(report.results), ratio=3, overflow="fold")
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
    out.print(outcome_counts(report.results))
    if report.findings:
        render_findings(report.findings)


def _marked_text(r: Result) -> Text:
    """The generation, with the repeating part (from the loop's start) marked: underlined on a
    terminal, after LOOP_MARK elsewhere."""
    text = r.text.replace("\n", "⏎")  # same length: loop_char still indexes it
    if r.loop_char is None:
        return Text(text)
    mark = "" if out.is_terminal else LOOP_MARK
    return Text(text[: r.loop_char] + mark) + Text(text[r.loop_char :], "red underline")


ARM_LETTERS = "ABC"


def render_diagnosis(d: Diagnosis) -> None:
    from ckpt_doctor.generate import OUTCOMES

    if d.findings:
        render_findings(d.findings)
    if d.arms:
        table = Table(title="A/B smoke run", title_justify="left")
        for col in ("", "arm", "keys loaded", *OUTCOMES, "note"):
            table.add_column(col, overflow="fold")
        for letter, arm in zip(ARM_LETTERS, d.arms, strict=False):
            table.add_row(
                letter,
                Text(arm.name),
                "" if arm.matched is None else str(arm.matched),
                *(str(arm.outcomes.get(o, 0)) for o in OUTCOMES),
                Text(arm.error or ""),
            )
        out.print(table)
        _arm_texts(d)
    style = "bold red" if d.root_cause else "green"
    _labelled(
        (
            Text("root cause:", style),
            Text.assemble((d.root_cause or "none", style), f"  {d.verdict}"),
        )
    )
    if d.fix:
        # A command to copy: one line however narrow the terminal, never hard-wrapped.
        out.print(Text.assemble(("fix:", "bold"), f" {d.fix}"), soft_wrap=True)


def _arm_texts(d: Diagnosis) -> None:
    """What each arm generated for each prompt, the loop marked: the evidence behind the
    counts."""
    ran = [(letter, a) for letter, a in zip(ARM_LETTERS, d.arms, strict=False) if a.results]
    if not ran:
        return
    everything = [r for _, a in ran for r in a.results]
    table = Table(title="Generations", title_justify="left", expand=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("arm", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column(_text_header(everything), ratio=4, overflow="fold")
    n = max(len(a.results) for _, a in ran)
    for i in range(n):
        rows = [(letter, a.results[i]) for letter, a in ran if i < len(a.results)]
        for k, (letter, r) in enumerate(rows):
            table.add_row(
                Text(r.prompt) if k == 0 else "",
                letter,
                Text(r.outcome, OUTCOME_STYLE[r.outcome]),
                _marked_text(r),
                end_section=k == len(rows) - 1,
            )
    out.print(table)


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
    shows = {"diagnose": render_diagnosis, "extract": render_extraction, "verify": render_verify}
    for title, show, part in lora_steps(result):  # the LoRA scene, when the world has one
        if title:
            step(title)
        shows.get(show, render_smoke)(part)
    out.print(Text(demo_summary(result), "bold green" if result.story_holds else "bold red"))
