"""Benchmark: ``ckpt-doctor diff`` vs the naive full-load diff, on a ~2 GiB LLaMA-shaped pair.

Each side runs in its own process (so one side's allocator state cannot help the other), repeated
alternately. Peak anonymous RSS is what matters: the naive diff materialises both checkpoints,
ckpt-doctor is supposed to stream/mmap them. Exit status: 0 if every target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_WORKDIR,
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

NAIVE_SCRIPT = Path(__file__).resolve().parent / "naive_diff.py"

# Targets (from the project brief).
MAX_CKPT_PEAK_MIB = 300.0
MAX_PEAK_RATIO = 0.15
MAX_WALL_RATIO = 1.0


def ckpt_doctor_available() -> bool:
    pkg = REPO_ROOT / "ckpt_doctor"
    return (pkg / "cli.py").exists() and (pkg / "diffing.py").exists()


def check_ckpt_run(m: Measured, expected: set[str]) -> dict[str, Any]:
    """Validate one ``ckpt-doctor diff --json`` run; exit 1 means 'differences found' (success)."""
    res: dict[str, Any] = {"ok": False, "returncode": m.returncode}
    if m.returncode not in (0, 1):
        res["error"] = f"exit code {m.returncode}: {m.stderr.strip()[-2000:]}"
        return res
    try:
        doc = parse_json_stdout(m.stdout)
        tensors = doc["tensors"]
        modified = sorted(t["name"] for t in tensors if t["status"] == "modified")
        res["added"] = sorted(t["name"] for t in tensors if t["status"] == "added")
        res["removed"] = sorted(t["name"] for t in tensors if t["status"] == "removed")
        res["other_status"] = sorted(
            f"{t['name']}:{t['status']}"
            for t in tensors
            if t["status"] not in ("modified", "added", "removed", "identical")
        )
        res["max_abs"] = {t["name"]: t.get("max_abs") for t in tensors if t["name"] in expected}
    except Exception as e:  # any malformed output is a failed run, not a crashed benchmark
        res["error"] = f"bad JSON output: {e!r}; stdout head: {m.stdout[:500]!r}"
        return res
    res["modified"] = modified
    res["ok"] = set(modified) == expected
    if not res["ok"]:
        res["error"] = f"modified set {modified} != expected {sorted(expected)}"
    return res


def check_naive_run(m: Measured, expected: set[str]) -> dict[str, Any]:
    res: dict[str, Any] = {"ok": False, "returncode": m.returncode}
    if m.returncode != 0:
        res["error"] = f"exit code {m.returncode}: {m.stderr.strip()[-2000:]}"
        return res
    try:
        doc = parse_json_stdout(m.stdout)
        res["modified"] = sorted(doc["changed"])
        res["added"] = sorted(doc["added"])
        res["removed"] = sorted(doc["removed"])
        res["max_abs"] = doc.get("max_abs", {})
    except Exception as e:
        res["error"] = f"bad JSON output: {e!r}; stdout head: {m.stdout[:500]!r}"
        return res
    res["ok"] = set(res["modified"]) == expected
    if not res["ok"]:
        res["error"] = f"changed set {res['modified']} != expected {sorted(expected)}"
    return res


def side_stats(runs: list[Measured]) -> dict[str, float]:
    return {
        "median_wall_s": median_of(r.wall_s for r in runs),
        "median_cpu_s": median_of(r.cpu_s for r in runs),
        "median_peak_rss_anon_mib": median_of(r.peak_rss_anon_mib for r in runs),
        "max_peak_rss_anon_mib": max(r.peak_rss_anon_mib for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-gib", type=float, default=2.0, help="approximate base.pth size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: WORKDIR/diff_memory.json")
    ap.add_argument(
        "--naive-only",
        action="store_true",
        help="only run the naive side (harness self-test while ckpt-doctor is unavailable)",
    )
    ap.add_argument(
        "--ckpt-doctor-cmd",
        default=None,
        help="command prefix for ckpt-doctor (default: '<this python> -m ckpt_doctor')",
    )
    args = ap.parse_args(argv)
    out_path = args.out or args.workdir / "diff_memory.json"
    run_ckpt = not args.naive_only
    if args.ckpt_doctor_cmd:
        ckpt_prefix = shlex.split(args.ckpt_doctor_cmd)
    else:
        ckpt_prefix = [sys.executable, "-m", "ckpt_doctor"]
    if run_ckpt and not args.ckpt_doctor_cmd and not ckpt_doctor_available():
        print("ckpt_doctor/cli.py or diffing.py missing; use --naive-only", file=sys.stderr)
        return 1

    info = build_llama_checkpoints(args.workdir, target_gib=args.target_gib, seed=args.seed)
    ft, base = info["finetuned"], info["base"]
    expected = set(info["perturbed"])
    py = sys.executable
    cmds = {
        "ckpt-doctor": [*ckpt_prefix, "diff", ft, "--base", base, "--json"],
        "naive": [py, str(NAIVE_SCRIPT), ft, base],
    }
    sides = ["ckpt-doctor", "naive"] if run_ckpt else ["naive"]
    checker = {"ckpt-doctor": check_ckpt_run, "naive": check_naive_run}

    # Both files fit in RAM; read them once so neither side pays cold I/O on its own.
    warm_page_cache([ft, base])
    load_at_start = load_average()

    runs: dict[str, list[Measured]] = {s: [] for s in sides}
    checks: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for side in sides:  # alternate ckpt-doctor / naive so drift hits both alike
            m = run_measured(cmds[side], env=child_env(), cwd=REPO_ROOT)
            c = checker[side](m, expected)
            runs[side].append(m)
            checks[side].append(c)
            status = "ok" if c["ok"] else f"FAIL ({c.get('error', '')[:300]})"
            print(
                f"[{i + 1}/{args.repeats}] {side:11s} wall {m.wall_s:7.2f} s  "
                f"cpu {m.cpu_s:6.2f} s  peak RssAnon {m.peak_rss_anon_mib:8.1f} MiB  "
                f"rc {m.returncode}  {status}",
                file=sys.stderr,
            )

    stats = {s: side_stats(runs[s]) for s in sides}
    correct = {s: all(c["ok"] for c in checks[s]) for s in sides}
    targets: list[dict[str, Any]] = [
        {"target": "naive diff finds exactly the perturbed tensors", "pass": correct["naive"]}
    ]
    if run_ckpt:
        ck, nv = stats["ckpt-doctor"], stats["naive"]
        peak_ratio = ck["max_peak_rss_anon_mib"] / nv["median_peak_rss_anon_mib"]
        wall_ratio = ck["median_wall_s"] / nv["median_wall_s"]
        same_sets = all(
            c.get("modified") == n.get("modified")
            for c, n in zip(checks["ckpt-doctor"], checks["naive"], strict=True)
        )
        targets += [
            {
                "target": "ckpt-doctor 'modified' == naive 'changed' == perturbed",
                "pass": correct["ckpt-doctor"] and same_sets,
            },
            {
                "target": f"ckpt-doctor max peak RssAnon <= {MAX_CKPT_PEAK_MIB:.0f} MiB",
                "value": ck["max_peak_rss_anon_mib"],
                "pass": ck["max_peak_rss_anon_mib"] <= MAX_CKPT_PEAK_MIB,
            },
            {
                "target": f"peak RssAnon ratio ckpt(max)/naive(median) <= {MAX_PEAK_RATIO}",
                "value": peak_ratio,
                "pass": peak_ratio <= MAX_PEAK_RATIO,
            },
            {
                "target": f"median wall ratio ckpt/naive <= {MAX_WALL_RATIO}",
                "value": wall_ratio,
                "pass": wall_ratio <= MAX_WALL_RATIO,
            },
        ]
    passed = all(t["pass"] for t in targets)

    rows = [
        [
            s,
            stats[s]["median_wall_s"],
            stats[s]["median_cpu_s"],
            stats[s]["median_peak_rss_anon_mib"],
            stats[s]["max_peak_rss_anon_mib"],
            ",".join(str(r.returncode) for r in runs[s]),
            "yes" if correct[s] else "NO",
        ]
        for s in sides
    ]
    if run_ckpt:
        ck, nv = stats["ckpt-doctor"], stats["naive"]
        rows.append(
            [
                "ratio ckpt/naive",
                ck["median_wall_s"] / nv["median_wall_s"],
                ck["median_cpu_s"] / nv["median_cpu_s"],
                ck["median_peak_rss_anon_mib"] / nv["median_peak_rss_anon_mib"],
                ck["max_peak_rss_anon_mib"] / nv["max_peak_rss_anon_mib"],
                "",
                "",
            ]
        )
    table = markdown_table(
        rows,
        [
            "diff",
            "median wall (s)",
            "median CPU (s)",
            "median peak RssAnon (MiB)",
            "max peak RssAnon (MiB)",
            "exit codes",
            "correct",
        ],
    )
    target_lines = [
        f"- [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}"
        + (f" (got {t['value']:.3f})" if "value" in t else "")
        for t in targets
    ]
    cfg = info["config"]
    report = "\n".join(
        [
            "## diff memory: ckpt-doctor diff vs naive torch.load diff",
            "",
            f"Machine: {machine_description()}",
            f"Load average: {load_at_start} at start, {load_average()} at end.",
            f"Files: base.pth {fmt_mib(info['base_bytes'])}, finetuned.pth "
            f"{fmt_mib(info['finetuned_bytes'])} (fp16 LLaMA dim {cfg['dim']}, "
            f"{cfg['n_layers']} layers, vocab {cfg['vocab']}; + fp32 LLaMA-Adapter, optimizer "
            "state); 2 base tensors perturbed.",
            f"Repeats: {args.repeats}, each run in a fresh process, sides alternated.",
            "",
            table,
            "",
            "Notes: peak RssAnon sampled from /proc/<pid>/status every ~1 ms (anonymous memory "
            "only; page-cache / mmap'd file pages are not counted). Page cache warmed once by "
            "reading both files before timing, so neither side pays cold I/O. Wall time includes "
            "interpreter start-up and `import torch` for both sides; CPU = child user+sys time, "
            "less sensitive than wall to other load on the machine.",
            "",
            *target_lines,
            "",
            f"Overall: {'PASS' if passed else 'FAIL'}",
        ]
    )
    print(report)

    write_json(
        out_path,
        {
            "benchmark": "diff_memory",
            "machine": machine_description(),
            "load_average_start": load_at_start,
            "files": {k: info[k] for k in ("base", "finetuned", "base_bytes", "finetuned_bytes")},
            "config": cfg,
            "perturbed": sorted(expected),
            "commands": {s: cmds[s] for s in sides},
            "repeats": args.repeats,
            "runs": {s: [r.summary() for r in runs[s]] for s in sides},
            "checks": checks,
            "stats": stats,
            "targets": targets,
            "passed": passed,
            "report_markdown": report,
        },
    )
    print(f"\nraw results: {out_path}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
