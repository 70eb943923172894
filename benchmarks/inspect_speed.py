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
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_WORKDIR,
    MIB,
    REPO_ROOT,
    Measured,
    build_llama_checkpoints,
    child_env,
    fmt_mib,
    load_average,
    machine_description,
    markdown_table,
    median_of,
    parse_json_stdout,
    run_measured,
    warm_page_cache,
    write_json,
)

MAX_WALL_S = 2.0
MAX_TOUCHED_FRACTION = 0.05

# --------------------------------------------------------------------------------------------
# Child side (runs in a separate process via --child)
# --------------------------------------------------------------------------------------------


def api_open_and_inspect() -> Callable[[str], tuple[Any, Any]]:
    """The one place naming ckpt-doctor's Python API; adjust here if the names change.

    Returns a function path -> (checkpoint handle, report). The handle is returned so the caller
    keeps it (and its mmap) alive while it reads smaps.
    """
    from ckpt_doctor.inspection import inspect_checkpoint
    from ckpt_doctor.reader import open_checkpoint

    def run(path: str) -> tuple[Any, Any]:
        ck = open_checkpoint(path)
        report = inspect_checkpoint(ck)
        return ck, report

    return run


def reference_open_and_inspect() -> Callable[[str], tuple[Any, Any]]:
    """Reference lower bound: torch.load(mmap=True) and touch only the adapter tensors."""
    import torch

    def run(path: str) -> tuple[Any, Any]:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ck = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        model = ck["model"]
        report = {
            k: float(v.float().abs().sum())
            for k, v in model.items()
            if k.startswith("adapter_") or k.endswith(".gate")
        }
        return ck, report

    return run


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


def child_main(path: str, which: str) -> int:
    factory = api_open_and_inspect if which == "ckpt-doctor" else reference_open_and_inspect
    run = factory()  # imports happen here, outside the timed region
    r0 = read_bytes_so_far()
    t0 = time.perf_counter()
    ck, report = run(path)
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


def ckpt_doctor_available() -> bool:
    pkg = REPO_ROOT / "ckpt_doctor"
    return (pkg / "cli.py").exists() and (pkg / "reader.py").exists()


def check_cli_run(m: Measured) -> dict[str, Any]:
    """exit 1 is expected (a training checkpoint yields warnings); 2 or worse is a failure."""
    res: dict[str, Any] = {"ok": False, "returncode": m.returncode}
    if m.returncode not in (0, 1):
        res["error"] = f"exit code {m.returncode}: {m.stderr.strip()[-2000:]}"
        return res
    try:
        doc = parse_json_stdout(m.stdout)
    except Exception as e:
        res["error"] = f"bad JSON output: {e!r}; stdout head: {m.stdout[:500]!r}"
        return res
    if isinstance(doc, dict):
        res["top_level_keys"] = sorted(doc)
        findings = doc.get("findings")
        if isinstance(findings, list):
            res["finding_ids"] = sorted({f.get("id") for f in findings if isinstance(f, dict)})
    res["ok"] = True
    return res


def run_children(which: str, path: str, repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, path]
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for _ in range(repeats):
        m = run_measured(cmd, env=child_env(), cwd=REPO_ROOT)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target-gib", type=float, default=2.0, help="approximate base.pth size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: WORKDIR/inspect_speed.json")
    ap.add_argument(
        "--ckpt-doctor-cmd",
        default=None,
        help="command prefix for ckpt-doctor (default: '<this python> -m ckpt_doctor')",
    )
    ap.add_argument(
        "--reference-only",
        action="store_true",
        help="skip ckpt-doctor; only run the torch mmap reference (harness self-test)",
    )
    ap.add_argument(
        "--child",
        nargs=2,
        metavar=("WHICH", "PATH"),
        help=argparse.SUPPRESS,  # internal: run the touched-pages child (ckpt-doctor|reference)
    )
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child[1], args.child[0])

    out_path = args.out or args.workdir / "inspect_speed.json"
    run_ckpt = not args.reference_only
    if run_ckpt and not args.ckpt_doctor_cmd and not ckpt_doctor_available():
        print("ckpt_doctor/cli.py or reader.py missing; use --reference-only", file=sys.stderr)
        return 1
    prefix = (
        shlex.split(args.ckpt_doctor_cmd)
        if args.ckpt_doctor_cmd
        else [sys.executable, "-m", "ckpt_doctor"]
    )

    info = build_llama_checkpoints(args.workdir, target_gib=args.target_gib, seed=args.seed)
    ft = info["finetuned"]
    file_mib = info["finetuned_bytes"] / MIB
    warm_page_cache([ft])  # inspect should be lazy; measure it, not the disk
    load_at_start = load_average()

    # Floors: what any Python CLI that imports torch pays before doing anything.
    floors: dict[str, dict[str, float]] = {}
    for label, code in (("python -c pass", "pass"), ("python -c 'import torch'", "import torch")):
        ms = [run_measured([sys.executable, "-c", code]) for _ in range(args.repeats)]
        floors[label] = {
            "median_wall_s": median_of(m.wall_s for m in ms),
            "median_cpu_s": median_of(m.cpu_s for m in ms),
        }

    cli_cmd = [*prefix, "inspect", ft, "--json"]
    cli_runs: list[Measured] = []
    cli_checks: list[dict[str, Any]] = []
    errors: list[str] = []
    if run_ckpt:
        for i in range(args.repeats):
            m = run_measured(cli_cmd, env=child_env(), cwd=REPO_ROOT)
            c = check_cli_run(m)
            cli_runs.append(m)
            cli_checks.append(c)
            print(
                f"[{i + 1}/{args.repeats}] inspect CLI wall {m.wall_s:6.2f} s  "
                f"cpu {m.cpu_s:5.2f} s  peak RssAnon {m.peak_rss_anon_mib:7.1f} MiB  "
                f"rc {m.returncode}  "
                f"{'ok' if c['ok'] else 'FAIL ' + c.get('error', '')[:300]}",
                file=sys.stderr,
            )
            if not c["ok"]:
                errors.append(f"CLI run {i + 1}: {c.get('error')}")

    child: dict[str, list[dict[str, Any]]] = {}
    for which in (["ckpt-doctor"] if run_ckpt else []) + ["reference"]:
        child[which], errs = run_children(which, ft, args.repeats)
        errors += errs

    def child_summary(which: str) -> dict[str, float] | None:
        rs = child.get(which) or []
        if not rs:
            return None
        touched = [r["touched_mib"] + r["read_mib"] for r in rs]
        return {
            "median_open_inspect_s": median_of(r["open_inspect_s"] for r in rs),
            "median_mmap_touched_mib": median_of(r["touched_mib"] for r in rs),
            "median_read_mib": median_of(r["read_mib"] for r in rs),
            "max_touched_total_mib": max(touched),
            "touched_fraction": max(touched) / file_mib,
            "mappings": rs[0]["mappings"],
            "median_child_peak_rss_anon_mib": median_of(r["child_peak_rss_anon_mib"] for r in rs),
        }

    summaries = {w: child_summary(w) for w in child}
    cli_stats = (
        {
            "median_wall_s": median_of(r.wall_s for r in cli_runs),
            "median_cpu_s": median_of(r.cpu_s for r in cli_runs),
            "median_peak_rss_anon_mib": median_of(r.peak_rss_anon_mib for r in cli_runs),
        }
        if cli_runs
        else None
    )

    targets: list[dict[str, Any]] = []
    if run_ckpt:
        s = summaries.get("ckpt-doctor")
        targets += [
            {
                "target": "inspect CLI exits 0/1 with JSON output on every run",
                "pass": bool(cli_checks) and all(c["ok"] for c in cli_checks),
            },
            {
                "target": f"inspect CLI median wall < {MAX_WALL_S} s",
                "value": cli_stats["median_wall_s"] if cli_stats else float("nan"),
                "pass": bool(cli_stats) and cli_stats["median_wall_s"] < MAX_WALL_S,
            },
            {
                "target": f"open+inspect touches < {MAX_TOUCHED_FRACTION:.0%} of the file "
                "(mmap Rss + read bytes, max over runs)",
                "value": s["touched_fraction"] if s else float("nan"),
                "pass": bool(s) and s["touched_fraction"] < MAX_TOUCHED_FRACTION,
            },
        ]
    else:
        r = summaries.get("reference")
        targets.append({"target": "reference child ran (harness self-test)", "pass": r is not None})
    passed = all(t["pass"] for t in targets)

    rows: list[list[Any]] = [
        [k, v["median_wall_s"], v["median_cpu_s"], "", "", "", "floor"] for k, v in floors.items()
    ]
    if cli_stats:
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
    labels = {
        "ckpt-doctor": "open_checkpoint + inspect_checkpoint (in-process)",
        "reference": "reference: torch.load(mmap=True) + adapter tensors",
    }
    for w, s in summaries.items():
        if s is None:
            rows.append([labels[w], "FAILED", "", "", "", "", ""])
            continue
        rows.append(
            [
                labels[w],
                s["median_open_inspect_s"],
                "",
                f"{s['median_mmap_touched_mib']:.2f} + {s['median_read_mib']:.2f}",
                f"{s['touched_fraction']:.3%}",
                s["median_child_peak_rss_anon_mib"],
                f"{s['mappings']} mapping(s) of the file",
            ]
        )
    table = markdown_table(
        rows,
        [
            "what",
            "median wall (s)",
            "median CPU (s)",
            "touched MiB (mmap Rss + read)",
            "touched / file",
            "peak RssAnon (MiB)",
            "note",
        ],
    )
    target_lines = [
        f"- [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}"
        + (f" (got {t['value']:.3f})" if "value" in t else "")
        for t in targets
    ]
    report = "\n".join(
        [
            "## inspect speed: `ckpt-doctor inspect` on a training checkpoint",
            "",
            f"Machine: {machine_description()}",
            f"Load average: {load_at_start} at start, {load_average()} at end.",
            f"File: finetuned.pth {fmt_mib(info['finetuned_bytes'])} (zip; fp16 LLaMA base + fp32 "
            "LLaMA-Adapter + optimizer state + argparse.Namespace args).",
            f"Repeats: {args.repeats}, fresh process each.",
            "",
            table,
            "",
            "Notes: CLI time is wall time of a fresh process (interpreter start-up and imports "
            "included; the floor rows show that cost alone); CPU = child user+sys time, less "
            "sensitive than wall to other load on the machine. In-process time covers only "
            "open+inspect after imports. Touched = Rss of the process's mappings of the file "
            "(/proc/self/smaps, handle kept alive) + bytes read via read()/pread (/proc/self/io "
            "rchar) during open+inspect. Page cache warmed before timing.",
            "",
            *target_lines,
            *(f"- error: {e}" for e in errors),
            "",
            f"Overall: {'PASS' if passed else 'FAIL'}",
        ]
    )
    print(report)
    write_json(
        out_path,
        {
            "benchmark": "inspect_speed",
            "machine": machine_description(),
            "load_average_start": load_at_start,
            "file": {"path": ft, "bytes": info["finetuned_bytes"]},
            "repeats": args.repeats,
            "floors_s": floors,
            "cli_command": cli_cmd if run_ckpt else None,
            "cli_runs": [r.summary() for r in cli_runs],
            "cli_checks": cli_checks,
            "cli_stats": cli_stats,
            "child_runs": child,
            "child_summaries": summaries,
            "targets": targets,
            "errors": errors,
            "passed": passed,
            "report_markdown": report,
        },
    )
    print(f"\nraw results: {out_path}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
