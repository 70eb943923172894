"""Shared benchmark harness: child-process measurement, reporting helpers, synthetic checkpoints.

Memory is measured as the peak of ``RssAnon`` sampled from ``/proc/<pid>/status``. We do not use
``ru_maxrss`` / ``VmHWM`` because they also count file-backed pages (page cache pages mapped by an
mmap of the checkpoint), which would make an mmap-based reader look as expensive as a full load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/ckpt-doctor-bench")
CKPT_DOCTOR = [sys.executable, "-m", "ckpt_doctor"]
MIB = 1024 * 1024
GIB = 1024 * MIB
POLL_INTERVAL_S = 0.001

# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    wall_s: float
    peak_rss_anon_mib: float
    returncode: int
    stdout: str
    stderr: str
    samples: int = 0  # how many RssAnon readings the poller got (sanity check on the sampling)
    cpu_s: float = 0.0  # child user+sys CPU: less sensitive than wall to other load on the box

    def summary(self) -> dict[str, Any]:
        """Numbers only (no captured output) for the raw-results JSON."""
        d = asdict(self)
        del d["stdout"], d["stderr"]
        return d


def _read_rss_anon_kib(pid: int) -> int | None:
    """RssAnon of a live process in KiB; None once it is gone or a zombie (no RssAnon line)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    i = data.find(b"RssAnon:")
    if i < 0:
        return None
    j = data.find(b"\n", i)
    return int(data[i + 8 : j].split()[0])


def run_measured(cmd: list[str], *, in_repo: bool = True) -> Measured:
    """Run ``cmd`` to completion, sampling its RssAnon every ~1 ms from a thread.

    ``in_repo``: run from the repo root with ``ckpt_doctor`` importable without install.
    Wall time covers Popen until the child's output is fully drained (i.e. the child exited), so
    interpreter start-up is included for every side alike.
    """
    env = None
    if in_repo:
        path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    peak_kib = 0
    samples = 0
    done = threading.Event()

    def poll(pid: int) -> None:
        nonlocal peak_kib, samples
        # Sleep-based polling: a busy loop would steal one of the (few) cores from the child.
        while not done.is_set():
            kib = _read_rss_anon_kib(pid)
            if kib is not None:
                samples += 1
                peak_kib = max(peak_kib, kib)
            time.sleep(POLL_INTERVAL_S)

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT if in_repo else None,
    )
    poller = threading.Thread(target=poll, args=(proc.pid,), daemon=True)
    poller.start()
    # communicate() drains both pipes, so a chatty child cannot deadlock on a full pipe.
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    # RUSAGE_CHILDREN only grows when a child is reaped; runs are sequential, so the delta is ours.
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Measured(
        wall_s=wall,
        peak_rss_anon_mib=peak_kib / 1024,
        returncode=proc.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        samples=samples,
        cpu_s=cpu,
    )


def median_of(runs: Iterable[float]) -> float:
    return float(statistics.median(list(runs)))


def run_stats(runs: Sequence[Measured], *, peak: bool = True) -> dict[str, float]:
    stats = {
        "median_wall_s": median_of(r.wall_s for r in runs),
        "median_cpu_s": median_of(r.cpu_s for r in runs),
    }
    if peak:
        stats["median_peak_rss_anon_mib"] = median_of(r.peak_rss_anon_mib for r in runs)
    return stats


def parse_json_stdout(stdout: str) -> Any:
    """Parse a child's JSON stdout, skipping any noise printed before the document."""
    return json.loads(stdout[max(stdout.find("{"), 0) :])


def check_run(
    m: Measured, ok_codes: Container[int], read: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """Check one run: an allowed exit code, and JSON stdout that ``read`` digests into fields."""
    res: dict[str, Any] = {"ok": False, "returncode": m.returncode}
    if m.returncode not in ok_codes:
        res["error"] = f"exit code {m.returncode}: {m.stderr.strip()[-2000:]}"
        return res
    try:
        res.update(read(parse_json_stdout(m.stdout)))
    except Exception as e:  # any malformed output is a failed run, not a crashed benchmark
        res["error"] = f"bad JSON output: {e!r}; stdout head: {m.stdout[:500]!r}"
        return res
    res["ok"] = True
    return res


def run_alternating(
    sides: dict[str, tuple[list[str], Callable[[Measured], dict[str, Any]]]], repeats: int
) -> tuple[dict[str, list[Measured]], dict[str, list[dict[str, Any]]]]:
    """Run each side's command ``repeats`` times and check every run.

    Sides take turns, so drift in the machine's load hits all of them alike.
    """
    runs: dict[str, list[Measured]] = {s: [] for s in sides}
    checks: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for i in range(repeats):
        for side, (cmd, check) in sides.items():
            m = run_measured(cmd)
            c = check(m)
            runs[side].append(m)
            checks[side].append(c)
            status = "ok" if c["ok"] else f"FAIL ({c.get('error', '')[:300]})"
            print(
                f"[{i + 1}/{repeats}] {side:11s} wall {m.wall_s:7.2f} s  cpu {m.cpu_s:6.2f} s  "
                f"peak RssAnon {m.peak_rss_anon_mib:8.1f} MiB  rc {m.returncode}  {status}",
                file=sys.stderr,
            )
    return runs, checks


# --------------------------------------------------------------------------------------------
# Benchmark script plumbing
# --------------------------------------------------------------------------------------------


def parse_common_args(
    ap: argparse.ArgumentParser, argv: list[str] | None, *, benchmark: str, repeats: int
) -> argparse.Namespace:
    """Add the options every benchmark shares, parse, and resolve ``--out`` under the workdir."""
    out_name = f"{benchmark}.json"
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--target-gib", type=float, default=2.0, help="approximate base.pth size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"default: WORKDIR/{out_name}")
    args = ap.parse_args(argv)
    args.out = args.out or args.workdir / out_name
    args.benchmark = benchmark
    return args


def prepare_checkpoints(args: argparse.Namespace, *warm: str) -> tuple[dict[str, Any], str]:
    """Build (or reuse) the checkpoints, warm the page cache for the ``warm`` files of them.

    Returns the checkpoint info and the load average once ready, i.e. at the start of timing.
    """
    from llama_files import build_llama_checkpoints

    info = build_llama_checkpoints(args.workdir, target_gib=args.target_gib, seed=args.seed)
    for k in warm:  # read once so that timed runs all see a warm page cache (no cold I/O)
        with open(info[k], "rb", buffering=0) as f:
            while f.read(16 * MIB):
                pass
    return info, load_average()


def target(text: str, passed: bool, value: float | None = None) -> dict[str, Any]:
    """One verdict of the report; ``value`` is the measured number, where there is one."""
    t: dict[str, Any] = {"target": text}
    if value is not None:
        t["value"] = value
    t["pass"] = passed
    return t


def finish(
    args: argparse.Namespace,
    *,
    title: str,
    load_at_start: str,
    body: Sequence[str],
    targets: list[dict[str, Any]],
    results: dict[str, Any],
    errors: list[str] | None = None,
) -> int:
    """Print the markdown report, write the raw-results JSON; exit 0 iff every target passes.

    ``body`` is the report between the machine/load lines and the target verdicts.
    """
    passed = all(t["pass"] for t in targets)
    machine = machine_description()
    report = "\n".join(
        [
            f"## {title}",
            "",
            f"Machine: {machine}",
            f"Load average: {load_at_start} at start, {load_average()} at end.",
            *body,
            "",
            *(
                f"- [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}"
                + (f" (got {t['value']:.3f})" if "value" in t else "")
                for t in targets
            ),
            *(f"- error: {e}" for e in errors or ()),
            "",
            f"Overall: {'PASS' if passed else 'FAIL'}",
        ]
    )
    print(report)
    write_json(
        args.out,
        {
            "benchmark": args.benchmark,
            "machine": machine,
            "load_average_start": load_at_start,
            **results,
            "targets": targets,
            **({"errors": errors} if errors is not None else {}),
            "passed": passed,
            "report_markdown": report,
        },
    )
    print(f"\nraw results: {args.out}", file=sys.stderr)
    return 0 if passed else 1


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _proc_field(path: str, prefix: str) -> str | None:
    """The rest of the first line of a /proc text file starting with ``prefix``."""
    try:
        for ln in Path(path).read_text().splitlines():
            if ln.startswith(prefix):
                return ln[len(prefix) :]
    except OSError:
        pass
    return None


def machine_description() -> str:
    cpu = _proc_field("/proc/cpuinfo", "model name")
    cpu = cpu.split(":", 1)[1].strip() if cpu else "unknown CPU"
    mem_kib = _proc_field("/proc/meminfo", "MemTotal:")
    ram_gib = int(mem_kib.split()[0]) / (1024 * 1024) if mem_kib else float("nan")
    try:
        # metadata avoids importing torch (slow, and pollutes the parent's memory) just for this.
        torch_v = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = "not installed"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram_gib:.1f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, torch {torch_v}"
    )


def load_average() -> str:
    """1/5/15-min load average: timings on a shared 2-core box are only as good as its quiet."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        return "unknown"
    return f"{one} / {five} / {fifteen} (1/5/15 min)"


def fmt_mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2) + "\n")
