"""Benchmark: ``ckpt-doctor diff`` vs the naive full-load diff, on a ~2 GiB LLaMA-shaped pair.

Each side runs in its own process (so one side's allocator state cannot help the other), repeated
alternately. Peak anonymous RSS is what matters: the naive diff materialises both checkpoints,
ckpt-doctor is supposed to stream/mmap them. Exit status: 0 if every target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

from common import (
    CKPT_DOCTOR,
    Measured,
    check_run,
    finish,
    fmt_mib,
    markdown_table,
    parse_common_args,
    prepare_checkpoints,
    run_alternating,
    run_stats,
    target,
)

NAIVE_SCRIPT = Path(__file__).resolve().parent / "naive_diff.py"

# Targets (from the project brief).
MAX_CKPT_PEAK_MIB = 300.0
MAX_PEAK_RATIO = 0.15
MAX_WALL_RATIO = 1.0


def read_ckpt_diff(doc: Any, expected: set[str]) -> dict[str, Any]:
    tensors = doc["tensors"]
    return {
        "added": sorted(t["name"] for t in tensors if t["status"] == "added"),
        "removed": sorted(t["name"] for t in tensors if t["status"] == "removed"),
        "other_status": sorted(
            f"{t['name']}:{t['status']}"
            for t in tensors
            if t["status"] not in ("modified", "added", "removed", "identical")
        ),
        "max_abs": {t["name"]: t.get("max_abs") for t in tensors if t["name"] in expected},
        "modified": sorted(t["name"] for t in tensors if t["status"] == "modified"),
    }


def read_naive_diff(doc: Any) -> dict[str, Any]:
    return {
        "modified": sorted(doc["changed"]),
        "added": sorted(doc["added"]),
        "removed": sorted(doc["removed"]),
        "max_abs": doc.get("max_abs", {}),
    }


def check_diff(side: str, m: Measured, expected: set[str]) -> dict[str, Any]:
    if side == "ckpt-doctor":  # exit 1 means 'differences found' (success)
        c = check_run(m, (0, 1), lambda doc: read_ckpt_diff(doc, expected))
    else:
        c = check_run(m, (0,), read_naive_diff)
    if c["ok"] and set(c["modified"]) != expected:
        c["ok"] = False
        c["error"] = f"modified set {c['modified']} != expected {sorted(expected)}"
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse_common_args(ap, argv, benchmark="diff_memory", repeats=3)
    # Both files fit in RAM; read them once so neither side pays cold I/O on its own.
    info, load_at_start = prepare_checkpoints(args, "finetuned", "base")
    ft, base = info["finetuned"], info["base"]
    expected = set(info["perturbed"])
    cmds = {
        "ckpt-doctor": [*CKPT_DOCTOR, "diff", ft, "--base", base, "--json"],
        "naive": [sys.executable, str(NAIVE_SCRIPT), ft, base],
    }

    runs, checks = run_alternating(
        {side: (cmd, partial(check_diff, side, expected=expected)) for side, cmd in cmds.items()},
        args.repeats,
    )

    stats = {
        s: {**run_stats(rs), "max_peak_rss_anon_mib": max(r.peak_rss_anon_mib for r in rs)}
        for s, rs in runs.items()
    }
    correct = {s: all(c["ok"] for c in cs) for s, cs in checks.items()}
    ck, nv = stats["ckpt-doctor"], stats["naive"]
    peak_ratio = ck["max_peak_rss_anon_mib"] / nv["median_peak_rss_anon_mib"]
    wall_ratio = ck["median_wall_s"] / nv["median_wall_s"]
    same_sets = all(
        c.get("modified") == n.get("modified")
        for c, n in zip(checks["ckpt-doctor"], checks["naive"], strict=True)
    )
    targets = [
        target("naive diff finds exactly the perturbed tensors", correct["naive"]),
        target(
            "ckpt-doctor 'modified' == naive 'changed' == perturbed",
            correct["ckpt-doctor"] and same_sets,
        ),
        target(
            f"ckpt-doctor max peak RssAnon <= {MAX_CKPT_PEAK_MIB:.0f} MiB",
            ck["max_peak_rss_anon_mib"] <= MAX_CKPT_PEAK_MIB,
            ck["max_peak_rss_anon_mib"],
        ),
        target(
            f"peak RssAnon ratio ckpt(max)/naive(median) <= {MAX_PEAK_RATIO}",
            peak_ratio <= MAX_PEAK_RATIO,
            peak_ratio,
        ),
        target(
            f"median wall ratio ckpt/naive <= {MAX_WALL_RATIO}",
            wall_ratio <= MAX_WALL_RATIO,
            wall_ratio,
        ),
    ]

    rows: list[list[Any]] = [
        [
            s,
            st["median_wall_s"],
            st["median_cpu_s"],
            st["median_peak_rss_anon_mib"],
            st["max_peak_rss_anon_mib"],
            ",".join(str(r.returncode) for r in runs[s]),
            "yes" if correct[s] else "NO",
        ]
        for s, st in stats.items()
    ]
    rows.append(["ratio ckpt/naive", *(ck[k] / nv[k] for k in ck), "", ""])
    headers = ["diff", "median wall (s)", "median CPU (s)", "median peak RssAnon (MiB)"]
    headers += ["max peak RssAnon (MiB)", "exit codes", "correct"]
    cfg = info["config"]
    return finish(
        args,
        title="diff memory: ckpt-doctor diff vs naive torch.load diff",
        load_at_start=load_at_start,
        body=[
            f"Files: base.pth {fmt_mib(info['base_bytes'])}, finetuned.pth "
            f"{fmt_mib(info['finetuned_bytes'])} (fp16 LLaMA dim {cfg['dim']}, "
            f"{cfg['n_layers']} layers, vocab {cfg['vocab']}; + fp32 LLaMA-Adapter, optimizer "
            "state); 2 base tensors perturbed.",
            f"Repeats: {args.repeats}, each run in a fresh process, sides alternated.",
            "",
            markdown_table(rows, headers),
            "",
            "Notes: peak RssAnon sampled from /proc/<pid>/status every ~1 ms (anonymous memory "
            "only; page-cache / mmap'd file pages are not counted). Page cache warmed once by "
            "reading both files before timing, so neither side pays cold I/O. Wall time includes "
            "interpreter start-up and `import torch` for both sides; CPU = child user+sys time, "
            "less sensitive than wall to other load on the machine.",
        ],
        targets=targets,
        results={
            "files": {k: info[k] for k in ("base", "finetuned", "base_bytes", "finetuned_bytes")},
            "config": cfg,
            "perturbed": sorted(expected),
            "commands": cmds,
            "repeats": args.repeats,
            "runs": {s: [r.summary() for r in rs] for s, rs in runs.items()},
            "checks": checks,
            "stats": stats,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
