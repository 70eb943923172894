"""--report FILE on diagnose and smoke-generate: Markdown whose tables are well formed, and
one self-contained HTML page (well-formed, no network) with a P(eos) chart per arm and the
gates as a layer x head heat map, both read back here."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from ckpt_doctor.generate import Result
from ckpt_doctor.loops import Loop
from ckpt_doctor.report import gate_heatmap, md_escape, md_marked

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "fixtures" / "world"
SVG = "{http://www.w3.org/2000/svg}"
PROMPTS = ["Name the opposite of up.", "Repeat the word [dog] | twice."]
runner = CliRunner()


def diagnose(*extra: str):
    args = ["diagnose", str(WORLD / "checkpoint-4.pth"), "--base", str(WORLD / "base")]
    args += [a for p in PROMPTS for a in ("--prompt", p)]
    return runner.invoke(app, [*args, "--max-new-tokens", "40", *extra])


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("reports")
    md, page = out / "diagnose.md", out / "diagnose.html"
    first = diagnose("--report", str(md), "--json")
    assert first.exit_code == 1, first.output
    second = diagnose("--report", str(page))
    assert second.exit_code == 1, second.output
    doc = json.loads(first.stdout)
    return {"md": md.read_text(), "html": page.read_text(), "root_cause": doc["root_cause"]}


# --------------------------------------------------------------------------- Markdown


def md_tables(text: str) -> list[list[list[str]]]:
    """Every table as rows of cells, split on unescaped pipes."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    parsed = []
    for rows in tables:
        cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
        parsed.append(cells)
    return parsed


def test_markdown_tables_are_well_formed(reports):
    tables = md_tables(reports["md"])
    assert len(tables) == 3  # findings, smoke runs, generations
    for table in tables:
        header, separator, *rows = table
        assert all(re.fullmatch(r"-{3,}", c) for c in separator)
        assert len(separator) == len(header)
        assert rows and all(len(row) == len(header) for row in rows), table
    findings, arms, generations = tables
    assert findings[0] == ["severity", "id", "message", "hint"]
    assert "LOAD_NOTHING" in {row[1] for row in findings[2:]}
    assert [row[0] for row in arms[2:]] == [
        "as upstream loads it",
        "extracted adapter on the base",
        "base alone",
    ]
    assert len(generations) - 2 == 3 * len(PROMPTS)  # every arm's text for every prompt
    assert generations[0] == ["prompt", "arm", "outcome", "tokens", "max P(eos)", "text"]


def test_markdown_has_the_verdict_fix_and_marked_loops(reports):
    md = reports["md"]
    assert f"root cause: `{reports['root_cause']}`" in md
    assert "```\nckpt-doctor extract " in md  # the fix command, ready to copy
    loops = [row for row in md_tables(md)[2][2:] if row[2] == "loop"]
    assert loops and all("**" in row[5] for row in loops)  # the repeating part in bold
    assert r"Repeat the word \[dog\] \| twice." in md  # user text escaped, table intact


def test_md_marked_keeps_spaces_outside_the_bold():
    r = Result("p", [1], text="a b. a b. a b.", loop_char=4)
    r.loop = Loop(period=2, start=2, repeats=3)
    assert md_marked(r) == "a b. **a b. a b.**"
    assert md_escape("x|y*z_\n") == r"x\|y\*z\_⏎"


# --------------------------------------------------------------------------- HTML


class _Balance(HTMLParser):
    """Every opened tag closed in order (void elements aside): what a browser need not fix."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def test_html_is_well_formed_and_self_contained(reports):
    page = reports["html"]
    parser = _Balance()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    root = ET.fromstring(page)  # also well-formed XML: every tag closed, every & escaped
    assert root.tag == "html"
    tags = {tag for tag, _ in parser.tags}
    assert not tags & {"script", "link", "img", "iframe", "object"}
    for _, attrs in parser.tags:
        assert "src" not in attrs and "href" not in attrs  # nothing fetched
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


def test_html_has_an_eos_chart_per_arm_and_the_gate_heat_map(reports):
    root = ET.fromstring(reports["html"])
    svgs = list(root.iter(f"{SVG}svg"))
    charts = [s for s in svgs if s.get("class") == "eos-chart"]
    maps = [s for s in svgs if s.get("class") == "gate-heatmap"]
    assert len(charts) == 3 and len(maps) == 1
    for chart in charts:
        lines = list(chart.iter(f"{SVG}polyline"))
        assert len(lines) == len(PROMPTS)
        for line in lines:
            points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
            assert len(points) >= 1 and all(0 <= x <= 640 and 0 <= y <= 220 for x, y in points)
    manifest = json.loads((WORLD / "manifest.json").read_text())
    adapted = [k for k, g in manifest["gates"].items() if any(g)]
    cells = list(maps[0].iter(f"{SVG}rect"))
    assert len(cells) == len(adapted) * 4  # layer x head
    titles = [c.find(f"{SVG}title").text for c in cells]
    assert titles[0].startswith(f"layer {adapted[0]}, head 0: g = ")


def test_html_marks_the_loop_and_escapes_user_text(reports):
    page = reports["html"]
    assert 'class="loop"' in page
    assert "Repeat the word [dog] | twice." in page  # brackets are not markup here
    assert "<dog>" not in page


def test_smoke_generate_report(tmp_path):
    page = tmp_path / "smoke.html"
    args = [
        "smoke-generate",
        "--base",
        str(WORLD / "base"),
        "--full",
        str(WORLD / "checkpoint-4.pth"),
    ]
    args += ["--load-as", "upstream", "--prompt", PROMPTS[0], "--max-new-tokens", "40"]
    result = runner.invoke(app, [*args, "--report", str(page)])
    assert result.exit_code == 1, result.output
    root = ET.fromstring(page.read_text())
    svgs = {s.get("class") for s in root.iter(f"{SVG}svg")}
    assert svgs == {"eos-chart", "gate-heatmap"}
    # loaded as upstream does, nothing matched: the gates the run used are all zero
    cells = [
        c.find(f"{SVG}title").text
        for c in root.iter(f"{SVG}rect")
        if c.find(f"{SVG}title") is not None
    ]
    assert cells and all(t.endswith("g = 0") for t in cells)
    md = tmp_path / "smoke.md"
    result = runner.invoke(app, [*args, "--report", str(md), "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["results"]
    tables = md_tables(md.read_text())
    assert [len(t) - 2 for t in tables] == [2, 1, 1]  # LOAD_NOTHING + LOOP; one arm; one prompt


@pytest.mark.parametrize("name", ["report.txt", "report"])
def test_unknown_report_suffix_is_refused_before_running(tmp_path, name):
    result = diagnose("--report", str(tmp_path / name))
    assert result.exit_code == 2
    assert ".md" in result.stderr and ".html" in result.stderr
    assert not (tmp_path / name).exists()


def test_a_report_never_overwrites_an_input(tmp_path):
    md = tmp_path / "c.md"
    md.write_text("keep")
    args = ["smoke-generate", "--base", str(WORLD / "base"), "--adapter", str(md)]
    result = runner.invoke(app, [*args, "--report", str(md)])
    assert result.exit_code == 2 and "one of the inputs" in result.stderr
    assert md.read_text() == "keep"


def test_heatmap_without_gates_says_so():
    assert "no adapter gates" in gate_heatmap({}, "")
    page = gate_heatmap({3: [0.5, -0.5, float("nan")]}, "note")
    root = ET.fromstring(page)
    fills = [r.get("fill") for r in root.iter(f"{SVG}rect")]
    assert fills == ["#ff0000", "#0000ff", "#888888"]
