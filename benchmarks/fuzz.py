"""Fuzz the CLI with damaged and hostile inputs; print the counts table.

    python benchmarks/fuzz.py --mutations 2000 --seed 0

Three parts, every case in its own process with a 20 s timeout:
1. ``--mutations`` seeded mutations of the fixtures and the layouts built from them (see
   fuzz_corpus.py), each run through one command: inspect, inspect --base, diff --base,
   extract -o, repair -o (round robin). sha256 of every input file before and after.
2. The payload set: pickles that run code (os.system, subprocess, eval/exec, getattr chains,
   dotted names under allowed-looking modules) at protocols 0-5, in plain pickles, legacy torch
   files and zips (as data.pkl, as another member, case-colliding, duplicated, deflated, in a
   second archive, before a zip). Each is first proven to run: a throwaway subprocess loads
   it with plain pickle and must create its sentinel file. Then ckpt-doctor runs on it
   (inspect, diff, extract, repair) and the sentinel must never appear.
3. SIGKILL during extract and repair at 10 points of a run on a ~100-300 MB checkpoint: no
   partial destination, no leftover temporary file.

Mode: a fork server. The parent imports ckpt_doctor (and torch) once; each case is a fork
running the CLI entry point (cli.main) with its argv, stdout/stderr to files, stdin
/dev/null; the parent waits with wait4, kills a child at the timeout and classifies by exit
status, signal and the stderr error line. Peak RSS is the child's ru_maxrss from wait4: its
high-water resident set, which includes what it inherited from the parent at fork (torch
and all, ~230 MiB) and mapped file pages, so it is an upper bound of a fresh CLI run.
Exit status of this script: 0 when every target holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked children share nothing

import fuzz_corpus as corpus
import fuzz_payloads as payloads

MIB = 1 << 20
SMALL = 5 * MIB
RSS_LIMIT_MIB = 512
COMMANDS = ("inspect", "inspect-base", "diff", "extract", "repair")


@dataclass
class Case:
    label: str  # the mutator / payload
    argv: list[str]
    inputs: list[Path]  # files and directories whose bytes must not change
    out_dir: Path | None = None
    sentinel: Path | None = None
    input_bytes: int = 0
    result: dict = field(default_factory=dict)


def _digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under the inputs (symlinks by target name, not followed)."""
    out = {}
    for root in paths:
        items = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.exists():
                out[str(p)] = "other"
    return out


def _size(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        for p in [root] if not root.is_dir() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def argv_for(command: str, target: Path, partner: Path, role: str, out: Path) -> list[str]:
    """The CLI argv of one case. A base seed is tested as --base of its clean partner."""
    ckpt, base = (target, partner) if role == "ckpt" else (partner, target)
    if command == "inspect":
        return ["inspect", str(target), "--json"]
    if command == "inspect-base":
        return ["inspect", str(ckpt), "--base", str(base), "--json"]
    if command == "diff":
        return ["diff", str(ckpt), "--base", str(base), "--json"]
    if command == "extract":
        return ["extract", str(ckpt), "--base", str(base), "-o", str(out / "a.safetensors")]
    return ["repair", str(ckpt), "--base", str(base), "-o", str(out / "fixed.pth")]


# --------------------------------------------------------------------------- fork server


def _child(argv: list[str], stdout: Path, stderr: Path) -> None:
    from ckpt_doctor import cli

    fd0 = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd0, 0)
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    sys.argv = ["ckpt-doctor", *argv]
    code = 70
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing to flush
                stream.flush()
        os._exit(code)


def run_cases(cases: list[Case], *, jobs: int, timeout: float, tmp: Path) -> None:
    """Run every case in its own forked process, ``jobs`` at a time."""
    pending = list(enumerate(cases))
    running: dict[int, tuple[int, float, Case, dict[str, str]]] = {}
    done = 0
    while pending or running:
        while pending and len(running) < jobs:
            i, case = pending.pop(0)
            before = _digest(case.inputs)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case.argv, tmp / f"{i}.out", tmp / f"{i}.err")
            running[pid] = (i, time.monotonic(), case, before)
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for p, (_, start, case, _) in running.items():
                if now - start > timeout and "timeout" not in case.result:
                    case.result["timeout"] = True
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.002)
            continue
        i, start, case, before = running.pop(pid)
        case.result.update(
            wall=time.monotonic() - start,
            rss_mib=usage.ru_maxrss / 1024,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            stderr=(tmp / f"{i}.err").read_text(errors="replace"),
            changed=_digest(case.inputs) != before,
        )
        (tmp / f"{i}.out").unlink(missing_ok=True)
        (tmp / f"{i}.err").unlink(missing_ok=True)
        if case.out_dir is not None and case.out_dir.exists():
            expected = {"a.safetensors", "fixed.pth"}
            case.result["leftover"] = [
                p.name for p in case.out_dir.iterdir() if p.name not in expected
            ]
        if case.sentinel is not None:
            case.result["executed"] = case.sentinel.exists()
        done += 1
        if done % 200 == 0:
            print(f"  {done}/{len(cases)} cases", file=sys.stderr, flush=True)


def classify(case: Case) -> str:
    r = case.result
    if r.get("timeout"):
        return "timeout"
    if r["signal"] is not None:
        return f"signal {r['signal']}"
    if r["code"] in (0, 1):
        return f"exit {r['code']}"
    if r["code"] == 2:
        line = r["stderr"].strip().splitlines()[-1:] or [""]
        word = (
            line[0].split("]")[0].removeprefix("error [") if line[0].startswith("error [") else ""
        )
        if not word and line[0].startswith(("Usage:", "Error:")):
            word = "USAGE (click)"
        return f"exit 2 {word or '(no error line)'}"
    return f"exit {r['code']}"


def one_line(case: Case) -> bool:
    """A refusal is exactly one stderr line (click's usage errors excepted: its format)."""
    lines = case.result["stderr"].strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error [")


# --------------------------------------------------------------------------- parts


def mutation_cases(seeds: dict, n: int, seed: int, work: Path) -> list[Case]:
    names = sorted(seeds)
    cases = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        s = seeds[names[i % len(names)]]
        case_dir = work / "cases" / str(i)
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        target = case_dir / s.path.name
        if s.path.is_dir():
            shutil.copytree(s.path, target)
            label = corpus.mutate_dir(rng, s.kind, target)
        else:
            shutil.copy(s.path, target)
            label = corpus.mutate_file(rng, s.kind, target)
        out = case_dir / "out"
        out.mkdir()
        command = COMMANDS[(i // len(names)) % len(COMMANDS)]
        partner = seeds[s.partner].path
        argv = argv_for(command, target, partner, s.role, out)
        inputs = [target, partner]
        cases.append(Case(f"{s.name}/{label}/{command}", argv, inputs, out, None, _size([target])))
    return cases


def payload_cases(seeds: dict, work: Path) -> tuple[list[Case], list[str]]:
    """Payload files, proven to run under plain pickle, and the CLI runs on them."""
    import pickle

    pdir = work / "payloads"
    shutil.rmtree(pdir, ignore_errors=True)
    pdir.mkdir(parents=True)
    benign = pickle.dumps({}, protocol=2)
    cases, unproven = [], []
    base = seeds["tiny_base"].path
    for protocol in range(6):
        for cname in payloads.payload_calls(pdir / "x", protocol):
            for kind, blob in payloads.payload_containers(b"", benign).items():
                tag = f"p{protocol}-{cname}-{kind}".replace("/", "_")
                sentinel = pdir / f"{tag}.ran"
                call = payloads.payload_calls(sentinel, protocol)[cname]
                evil = payloads.payload_pickle(call, protocol)
                blob = payloads.payload_containers(evil, benign)[kind]
                path = pdir / f"{tag}.pth"
                path.write_bytes(blob)
                proof = [sys.executable, "-c", _PROOF, str(path)]
                subprocess.run(proof, cwd=corpus.REPO, timeout=60, capture_output=True)
                if not sentinel.exists():
                    unproven.append(tag)
                    continue
                sentinel.unlink()
                for command in ("inspect", "diff", "extract", "repair"):
                    out = pdir / f"{tag}.{command}.out"
                    out.mkdir()
                    argv = argv_for(command, path, base, "ckpt", out)
                    label = f"payload/{cname}/{kind}/{command}"
                    cases.append(Case(label, argv, [path], out, sentinel, path.stat().st_size))
    return cases, unproven


_PROOF = (
    "import sys; sys.path.insert(0, 'benchmarks'); import fuzz_payloads, pathlib; "
    "fuzz_payloads.plain_load_all(pathlib.Path(sys.argv[1]))"
)


def kill_inputs(work: Path) -> dict[str, tuple[Path, list[str], str]]:
    """A ~100 MB adapter (extract writes 100 MB) and a ~300 MB prefixed state dict (repair
    writes 300 MB); built once, deterministic."""
    import argparse as ap

    import torch

    kdir = work / "kill"
    kdir.mkdir(parents=True, exist_ok=True)
    adapter, prefixed = kdir / "big_adapter.pth", kdir / "big_prefixed.pth"
    g = torch.Generator().manual_seed(0)
    if not adapter.exists():
        model = {"adapter_query.weight": torch.randn(6400, 4096, generator=g)}
        model |= {f"layers.{i}.attention.gate": torch.full((1, 32, 1, 1), 0.1) for i in range(4)}
        args = ap.Namespace(adapter_len=1600, adapter_layer=4, max_seq_len=512)
        torch.save({"model": model, "epoch": 1, "args": args}, adapter)
    if not prefixed.exists():
        sd = {f"module.layers.{i}.feed_forward.w1.weight": torch.randn(4096, 2048, generator=g)
              for i in range(9)}  # fmt: skip
        torch.save(sd, prefixed)
    return {
        "extract": (adapter, ["extract", str(adapter)], "a.safetensors"),
        "repair": (prefixed, ["repair", str(prefixed)], "fixed.pth"),
    }


def kill_test(work: Path) -> list[dict]:
    """SIGKILL at 5 points of extract and 5 of repair, spread from 35% to 95% of an
    uninterrupted run (every other one onto an existing destination with --force): the
    destination must be absent, the old file or the complete new one, and nothing else left."""
    results = []
    cli = [sys.executable, "-m", "ckpt_doctor"]
    for name, (src, argv, out_name) in kill_inputs(work).items():
        out_dir = work / "kill" / f"{name}.out"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        dest = out_dir / out_name
        start = time.monotonic()
        subprocess.run([*cli, *argv, "-o", str(dest)], check=False, capture_output=True)
        total = time.monotonic() - start
        complete = hashlib.sha256(dest.read_bytes()).hexdigest()
        dest.unlink()
        src_hash = hashlib.sha256(src.read_bytes()).hexdigest()
        for k in range(1, 6):
            force = k % 2 == 0
            if force:
                dest.write_bytes(b"the old output")
            cmd = [*cli, *argv, "-o", str(dest), *(["--force"] if force else [])]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            at = total * (0.35 + 0.6 * (k - 1) / 4)  # from the reads to the end of the write
            time.sleep(at)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            state = "absent"
            if dest.exists():
                digest = hashlib.sha256(dest.read_bytes()).hexdigest()
                old = dest.read_bytes() == b"the old output"
                state = "old" if old else ("complete" if digest == complete else "PARTIAL")
            leftover = [p.name for p in out_dir.iterdir() if p.name != out_name]
            changed = hashlib.sha256(src.read_bytes()).hexdigest() != src_hash
            results.append(
                {"command": name, "at_s": round(at, 2), "of_s": round(total, 2), "force": force,
                 "destination": state, "leftover": leftover, "input_changed": changed}
            )  # fmt: skip
            for p in out_dir.iterdir():
                p.unlink()
    return results


def _table(counter: Counter, title: str) -> list[str]:
    lines = [f"| {title} | cases |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counter.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutations", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ckpt-doctor-fuzz"))
    ap.add_argument("--skip-payloads", action="store_true")
    ap.add_argument("--skip-kill", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    import torch

    torch.set_num_threads(1)
    import safetensors.torch  # noqa: F401 - preloaded for the forked children

    from ckpt_doctor import cli, extraction, inspection, render, repair  # noqa: F401

    work = args.workdir
    seeds = corpus.build_seeds(work / "seeds")
    tmp = work / "io"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"building {args.mutations} mutations (seed {args.seed})", file=sys.stderr)
    cases = mutation_cases(seeds, args.mutations, args.seed, work)
    unproven: list[str] = []
    if not args.skip_payloads:
        print("building and proving the payload set", file=sys.stderr)
        payloads, unproven = payload_cases(seeds, work)
        cases += payloads
    print(f"running {len(cases)} cases, {args.jobs} at a time", file=sys.stderr)
    t1 = time.monotonic()
    run_cases(cases, jobs=args.jobs, timeout=args.timeout, tmp=tmp)
    run_s = time.monotonic() - t1
    kills = [] if args.skip_kill else kill_test(work)

    mutated = [c for c in cases if c.sentinel is None]
    payload = [c for c in cases if c.sentinel is not None]
    classes = Counter(classify(c) for c in mutated)
    pclasses = Counter(classify(c) for c in payload)
    every = [*mutated, *payload]
    small = [c for c in every if c.input_bytes < SMALL]
    refused = [c for c in every if c.result.get("code") == 2]
    internal = [c for c in every if classify(c) == "exit 2 INTERNAL"]
    summary = {
        "mutations": len(mutated),
        "payload runs": len(payload),
        "payload files proven to run under plain pickle": len({c.sentinel for c in payload}),
        "payload files that did not run under plain pickle (not counted)": len(unproven),
        "executed payloads": sum(c.result.get("executed", False) for c in payload),
        "signals": sum(
            c.result["signal"] is not None and not c.result.get("timeout") for c in every
        ),
        "timeouts": sum(bool(c.result.get("timeout")) for c in every),
        "INTERNAL": len(internal),
        "uncaught (exit 70)": sum(c.result.get("code") == 70 for c in every),
        "inputs changed": sum(c.result["changed"] for c in every),
        "leftover files in output dirs": sum(bool(c.result.get("leftover")) for c in every),
        "cases with inputs < 5 MB": len(small),
        "max peak RSS, inputs < 5 MB (MiB)": round(
            max((c.result["rss_mib"] for c in small), default=0), 1
        ),
        f"runs over {RSS_LIMIT_MIB} MiB (inputs < 5 MB)": sum(
            c.result["rss_mib"] > RSS_LIMIT_MIB for c in small
        ),
        "exit-2 runs": len(refused),
        "exit-2 runs without exactly one error line": sum(not one_line(c) for c in refused),
        "SIGKILL points": len(kills),
        "SIGKILL: partial destination": sum(k["destination"] == "PARTIAL" for k in kills),
        "SIGKILL: leftover temp files": sum(bool(k["leftover"]) for k in kills),
        "SIGKILL: input changed": sum(k["input_changed"] for k in kills),
        "wall time of the runs (s)": round(run_s, 1),
        "wall time in all (s)": round(time.monotonic() - t0, 1),
    }
    lines = ["| what | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in summary.items()]]
    lines += ["", *_table(classes, "mutations: outcome")]
    lines += ["", *_table(pclasses, "payload runs: outcome")]
    if kills:
        lines += [
            "",
            "| SIGKILL | at (s) of | --force | destination | leftover |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k['command']} | {k['at_s']} of {k['of_s']} | {k['force']} | {k['destination']} "
            f"| {len(k['leftover'])} |"
            for k in kills
        ]
    print("\n".join(lines))
    for c in internal[:20]:
        print(f"INTERNAL: {c.label}: {c.result['stderr'].strip()[:300]}", file=sys.stderr)
    for c in [c for c in every if c.result["signal"] is not None][:20]:
        print(f"SIGNAL/TIMEOUT: {c.label}: {c.argv}", file=sys.stderr)
    for c in [c for c in refused if not one_line(c)][:20]:
        print(f"NOT ONE LINE: {c.label}: {c.result['stderr'][:300]!r}", file=sys.stderr)
    for c in [c for c in small if c.result["rss_mib"] > RSS_LIMIT_MIB][:20]:
        print(f"RSS {c.result['rss_mib']:.0f} MiB: {c.label}: {c.argv}", file=sys.stderr)
    details = [
        {"label": c.label, "argv": c.argv, "class": classify(c), "rss_mib": c.result["rss_mib"],
         "wall_s": round(c.result["wall"], 3), "stderr": c.result["stderr"][-400:]}
        for c in every
    ]  # fmt: skip
    (work / "fuzz-results.json").write_text(
        json.dumps(
            {"summary": summary, "unproven": unproven, "kills": kills, "cases": details}, indent=1
        )
    )
    failed = (
        summary["executed payloads"] or summary["signals"] or summary["timeouts"]
        or summary["INTERNAL"] or summary["uncaught (exit 70)"] or summary["inputs changed"]
        or summary[f"runs over {RSS_LIMIT_MIB} MiB (inputs < 5 MB)"]
        or summary["exit-2 runs without exactly one error line"]
        or summary["SIGKILL: partial destination"] or summary["SIGKILL: leftover temp files"]
        or summary["leftover files in output dirs"] or summary["SIGKILL: input changed"]
    )  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
