"""Benchmark: ``ckpt-doctor inspect`` on a ~2 GiB training checkpoint must be fast and lazy.

Two measurements on the same ``finetuned.pth`` as ``diff_memory.py``:

1. wall time of ``python -m ckpt_doctor inspect finetuned.pth --json`` (fresh process each run);
2. a child process that opens + inspects the checkpoint through the Python API and then reports
   how much of the file it actually touched: the ``Rss:`` of its mappings of the file in
   ``/proc/self/smaps`` (pages faulted in through an mmap) plus the bytes it read with read()/pread
   (``rchar`` in ``/proc/self/io``), so a reader that does not mmap cannot pass by reading instead.

Exit status: 0 if every target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    CKPT_DOCTOR,
    MIB,
    check_run,
    finish,
    fmt_mib,
    markdown_table,
    median_of,
    parse_common_args,
    parse_json_stdout,
    prepare_checkpoints,
    run_alternating,
    run_measured,
    run_stats,
    target,
)

MAX_WALL_S = 2.0
MAX_TOUCHED_FRACTION = 0.05
CHILD_LABELS = {
    "ckpt-doctor": "open_checkpoint + inspect_checkpoint (in-process)",
    "reference": "reference: torch.load(mmap=True) + adapter tensors",
}

# --------------------------------------------------------------------------------------------
# Child side (runs in a separate process via --child)
# --------------------------------------------------------------------------------------------

_SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ [0-9a-f]+ \S+ \d+\s*(.*)$")


def file_mapping_rss(path: str) -> dict[str, float]:
    """Sum Rss / Size (KiB) over this process's mappings of ``path`` from /proc/self/smaps."""
    target = os.path.realpath(path)
    rss_kib = size_kib = 0
    n_maps = 0
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = _SMAPS_HEADER.match(line)
            if m:
                current = m.group(1).removesuffix(" (deleted)") == target
                n_maps += current
            elif current and line.startswith("Rss:"):
                rss_kib += int(line.split()[1])
            elif current and line.startswith("Size:"):
                size_kib += int(line.split()[1])
    return {"mappings": n_maps, "rss_mib": rss_kib / 1024, "mapped_mib": size_kib / 1024}


def read_bytes_so_far() -> int:
    # rchar: bytes passed through read()/pread() (page cache hits included) by this process.
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def child_main(which: str, path: str) -> int:
    # Imports happen here, outside the timed region. Both return the checkpoint handle so it
    # (and its mmap) stays alive while smaps is read.
    if which == "ckpt-doctor":
        from ckpt_doctor.inspection import inspect_checkpoint
        from ckpt_doctor.reader import open_checkpoint

        def run() -> tuple[Any, Any]:
            ck = open_checkpoint(path)
            return ck, inspect_checkpoint(ck)

    else:  # reference lower bound: torch.load(mmap=True), touching only the adapter tensors
        import torch

        def run() -> tuple[Any, Any]:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ck = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            report = {
                k: float(v.float().abs().sum())
                for k, v in ck["model"].items()
                if k.startswith("adapter_") or k.endswith(".gate")
            }
            return ck, report

    r0 = read_bytes_so_far()
    t0 = time.perf_counter()
    ck, report = run()
    elapsed = time.perf_counter() - t0
    read_mib = (read_bytes_so_far() - r0) / MIB
    maps = file_mapping_rss(path)  # ck is still referenced here, so its mmap is still live
    out = {
        "open_inspect_s": elapsed,
        "touched_mib": maps["rss_mib"],
        "read_mib": read_mib,
        "mappings": maps["mappings"],
        "mapped_mib": maps["mapped_mib"],
        "file_mib": os.path.getsize(path) / MIB,
        "report_type": type(report).__name__,
    }
    del ck
    print(json.dumps(out))
    return 0


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def read_inspect_json(doc: Any) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if isinstance(doc, dict):
        res["top_level_keys"] = sorted(doc)
        findings = doc.get("findings")
        if isinstance(findings, list):
            res["finding_ids"] = sorted({f.get("id") for f in findings if isinstance(f, dict)})
    return res


def run_children(which: str, path: str, repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, path]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for _ in range(repeats):
        m = run_measured(cmd)
        try:
            if m.returncode != 0:
                raise RuntimeError(f"exit code {m.returncode}: {m.stderr.strip()[-2000:]}")
            d = parse_json_stdout(m.stdout)
            d["child_peak_rss_anon_mib"] = m.peak_rss_anon_mib
            results.append(d)
        except Exception as e:
            errors.append(f"{which} child: {e}")
            print(f"{which} child failed: {e}", file=sys.stderr)
    return results, errors


def child_summary(rs: list[dict[str, Any]], file_mib: float) -> dict[str, float] | None:
    if not rs:
        return None
    touched = max(r["touched_mib"] + r["read_mib"] for r in rs)
    return {
        "median_open_inspect_s": median_of(r["open_inspect_s"] for r in rs),
        "median_mmap_touched_mib": median_of(r["touched_mib"] for r in rs),
        "median_read_mib": median_of(r["read_mib"] for r in rs),
        "max_touched_total_mib": touched,
        "touched_fraction": touched / file_mib,
        "mappings": rs[0]["mappings"],
        "median_child_peak_rss_anon_mib": median_of(r["child_peak_rss_anon_mib"] for r in rs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--child",
        nargs=2,
        metavar=("WHICH", "PATH"),
        help=argparse.SUPPRESS,  # internal: run the touched-pages child (ckpt-doctor|reference)
    )
    args = parse_common_args(ap, argv, benchmark="inspect_speed", repeats=5)
    if args.child:
        return child_main(*args.child)

    # inspect should be lazy; measure it, not the disk
    info, load_at_start = prepare_checkpoints(args, "finetuned")
    ft = info["finetuned"]

    # Floors: what any Python CLI that imports torch pays before doing anything.
    floors: dict[str, dict[str, float]] = {}
    for label, code in (("python -c pass", "pass"), ("python -c 'import torch'", "import torch")):
        cmd = [sys.executable, "-c", code]
        ms = [run_measured(cmd, in_repo=False) for _ in range(args.repeats)]
        floors[label] = run_stats(ms, peak=False)

    cli_cmd = [*CKPT_DOCTOR, "inspect", ft, "--json"]
    # exit 1 is expected (a training checkpoint yields warnings); 2 or worse is a failure.
    runs, checks = run_alternating(
        {"inspect CLI": (cli_cmd, lambda m: check_run(m, (0, 1), read_inspect_json))},
        args.repeats,
    )
    cli_runs, cli_checks = runs["inspect CLI"], checks["inspect CLI"]
    errors = [f"CLI run {i + 1}: {c.get('error')}" for i, c in enumerate(cli_checks) if not c["ok"]]

    child: dict[str, list[dict[str, Any]]] = {}
    for which in CHILD_LABELS:
        child[which], errs = run_children(which, ft, args.repeats)
        errors += errs
    summaries = {w: child_summary(rs, info["finetuned_bytes"] / MIB) for w, rs in child.items()}
    cli_stats = run_stats(cli_runs)

    s = summaries["ckpt-doctor"]
    targets = [
        target(
            "inspect CLI exits 0/1 with JSON output on every run",
            all(c["ok"] for c in cli_checks),
        ),
        target(
            f"inspect CLI median wall < {MAX_WALL_S} s",
            cli_stats["median_wall_s"] < MAX_WALL_S,
            cli_stats["median_wall_s"],
        ),
        target(
            f"open+inspect touches < {MAX_TOUCHED_FRACTION:.0%} of the file "
            "(mmap Rss + read bytes, max over runs)",
            bool(s) and s["touched_fraction"] < MAX_TOUCHED_FRACTION,
            s["touched_fraction"] if s else float("nan"),
        ),
    ]

    rows: list[list[Any]] = [
        [k, v["median_wall_s"], v["median_cpu_s"], "", "", "", "floor"] for k, v in floors.items()
    ]
    rows.append(
        [
            "`ckpt-doctor inspect --json` (CLI)",
            cli_stats["median_wall_s"],
            cli_stats["median_cpu_s"],
            "",
            "",
            cli_stats["median_peak_rss_anon_mib"],
            "exit " + ",".join(str(r.returncode) for r in cli_runs),
        ]
    )
    for w, sm in summaries.items():
        if sm is None:
            rows.append([CHILD_LABELS[w], "FAILED", "", "", "", "", ""])
            continue
        rows.append(
            [
                CHILD_LABELS[w],
                sm["median_open_inspect_s"],
                "",
                f"{sm['median_mmap_touched_mib']:.2f} + {sm['median_read_mib']:.2f}",
                f"{sm['touched_fraction']:.3%}",
                sm["median_child_peak_rss_anon_mib"],
                f"{sm['mappings']} mapping(s) of the file",
            ]
        )
    headers = ["what", "median wall (s)", "median CPU (s)", "touched MiB (mmap Rss + read)"]
    headers += ["touched / file", "peak RssAnon (MiB)", "note"]
    return finish(
        args,
        title="inspect speed: `ckpt-doctor inspect` on a training checkpoint",
        load_at_start=load_at_start,
        body=[
            f"File: finetuned.pth {fmt_mib(info['finetuned_bytes'])} (zip; fp16 LLaMA base + fp32 "
            "LLaMA-Adapter + optimizer state + argparse.Namespace args).",
            f"Repeats: {args.repeats}, fresh process each.",
            "",
            markdown_table(rows, headers),
            "",
            "Notes: CLI time is wall time of a fresh process (interpreter start-up and imports "
            "included; the floor rows show that cost alone); CPU = child user+sys time, less "
            "sensitive than wall to other load on the machine. In-process time covers only "
            "open+inspect after imports. Touched = Rss of the process's mappings of the file "
            "(/proc/self/smaps, handle kept alive) + bytes read via read()/pread (/proc/self/io "
            "rchar) during open+inspect. Page cache warmed before timing.",
        ],
        targets=targets,
        results={
            "file": {"path": ft, "bytes": info["finetuned_bytes"]},
            "repeats": args.repeats,
            "floors_s": floors,
            "cli_command": cli_cmd,
            "cli_runs": [r.summary() for r in cli_runs],
            "cli_checks": cli_checks,
            "cli_stats": cli_stats,
            "child_runs": child,
            "child_summaries": summaries,
        },
        errors=errors,
    )


if __name__ == "__main__":
    raise SystemExit(main())
