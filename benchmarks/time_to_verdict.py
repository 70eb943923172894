"""Time to a verdict: ``smoke-generate`` and ``diagnose`` as fresh processes on a 7B-shaped
model, with the timings block of their JSON (import, read, host->device, build,
compile/capture, checks, prefill, decode).

The files (made once, reused; fp16, random, 7B-shaped layers: dim 4096, 32 heads, FFN 11008,
vocab 32000; ``--n-layers`` of them, 32 for the real size):

- ``base/``: a Meta directory (``consolidated.00.pth``, ``params.json``, the fixture world's
  256-piece ``tokenizer.model``; the output rows past 256 are zero, so that greedy ids stay
  within the tokenizer while the whole 32000-row projection is still read each step);
- ``checkpoint-4.pth``: an upstream-style LLaMA-Adapter v1 training checkpoint (the whole model
  nested under ``'model'`` with the adapter, AdamW state for the adapter, ``args``): the file
  diagnose is asked about (upstream's load matches nothing: LOAD_NOTHING);
- ``adapter.pth``: its adapter tensors alone, the file one smoke-generate runs.

Sides, alternating, median wall of fresh processes (warm page cache), peak RssAnon:

- ``smoke-generate --base base --adapter adapter.pth``;
- ``diagnose checkpoint-4.pth --base base``: the base loaded once, the arms swapping adapters;
- ``diagnose, unshared`` (``--sides all``): the same diagnose with every arm loading its own
  base and running its own generation, as diagnose did before the shared base: the before side.

    python benchmarks/time_to_verdict.py --n-layers 8 --prompts 4 --max-new-tokens 16
    python benchmarks/time_to_verdict.py --device cuda --n-layers 32 --prompts 32 \\
        --max-new-tokens 128                                        (run_gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from common import (
    load_average,
    machine_description,
    markdown_table,
    run_measured,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "fixtures" / "world" / "tokenizer.model"
SHAPE_7B = {"dim": 4096, "n_heads": 32, "multiple_of": 256, "vocab_size": 32000,
            "norm_eps": 1e-6}  # fmt: skip
ADAPTER_LEN, ADAPTER_LAYER = 10, 8  # the last 8 layers (all of them below 8)


def build(workdir: Path, n_layers: int, *, device: str, dim: int = 4096) -> dict[str, Path]:
    """The three files, made on ``device`` (fast random numbers on a GPU) and saved."""
    import torch

    shape = {**SHAPE_7B, "dim": dim, "n_heads": max(1, dim // 128), "n_layers": n_layers}
    stamp, paths = workdir / "build.json", _paths(workdir)
    if stamp.is_file() and json.loads(stamp.read_text()) == shape:
        return paths
    paths["base"].mkdir(parents=True, exist_ok=True)
    hidden = int(2 * 4 * dim / 3)
    hidden = 256 * ((hidden + 255) // 256)
    vocab, g = shape["vocab_size"], torch.Generator(device=device).manual_seed(0)

    def rnd(*size: int, std: float = 0.02) -> torch.Tensor:
        t = torch.randn(size, generator=g, device=device, dtype=torch.float32) * std
        return t.half().cpu()

    sd = {"tok_embeddings.weight": rnd(vocab, dim, std=1.0)}
    for i in range(n_layers):
        p = f"layers.{i}."
        for w in ("wq", "wk"):
            sd[f"{p}attention.{w}.weight"] = rnd(dim, dim, std=0.05)
        for w in ("wv", "wo"):
            sd[f"{p}attention.{w}.weight"] = rnd(dim, dim)
        sd[p + "feed_forward.w1.weight"] = rnd(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = rnd(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = rnd(hidden, dim)
        sd[p + "attention_norm.weight"] = torch.ones(dim, dtype=torch.float16)
        sd[p + "ffn_norm.weight"] = torch.ones(dim, dtype=torch.float16)
    sd["norm.weight"] = torch.ones(dim, dtype=torch.float16)
    out = rnd(vocab, dim, std=0.5)
    out[256:] = 0  # greedy ids stay within the 256-piece tokenizer
    sd["output.weight"] = out
    torch.save(sd, paths["base"] / "consolidated.00.pth")
    params = {k: shape[k] for k in ("dim", "n_heads", "n_layers", "multiple_of", "norm_eps")}
    (paths["base"] / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    shutil.copy(TOKENIZER, paths["base"] / "tokenizer.model")
    a_layer = min(ADAPTER_LAYER, n_layers)
    adapter = {"adapter_query.weight": rnd(a_layer * ADAPTER_LEN, dim, std=1.0).float()}
    for i in range(n_layers):
        gate = 0.3 if i >= n_layers - a_layer else 0.0
        adapter[f"layers.{i}.attention.gate"] = torch.full((1, shape["n_heads"], 1, 1), gate)
    torch.save(adapter, paths["adapter"])
    optim = {"state": {k: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v),
                           "step": torch.tensor(40.0)} for k, v in enumerate(adapter.values())},
             "param_groups": [{"lr": 9e-3, "params": list(range(len(adapter)))}]}  # fmt: skip
    args = argparse.Namespace(adapter_len=ADAPTER_LEN, adapter_layer=a_layer, max_seq_len=512)
    ckpt = {"model": {**sd, **adapter}, "optimizer": optim, "epoch": 4, "args": args,
            "scaler": {"scale": 65536.0}}  # fmt: skip
    torch.save(ckpt, paths["checkpoint"])
    stamp.write_text(json.dumps(shape))
    return paths


def _paths(workdir: Path) -> dict[str, Path]:
    return {"base": workdir / "base", "checkpoint": workdir / "checkpoint-4.pth",
            "adapter": workdir / "adapter.pth"}  # fmt: skip


def commands(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, list[str]]:
    prompts = [f"Count the letters of word number {i}." for i in range(args.prompts)]
    common = [a for p in prompts for a in ("--prompt", p)]
    common += ["--max-new-tokens", str(args.max_new_tokens), "--device", args.device]
    common += ["--template", args.template, "--json"]
    cli = [sys.executable, "-m", "ckpt_doctor"]
    base = str(paths["base"])
    out = {
        "smoke-generate": [*cli, "smoke-generate", "--base", base, "--adapter",
                           str(paths["adapter"]), *common],
        "diagnose": [*cli, "diagnose", str(paths["checkpoint"]), "--base", base, *common],
    }  # fmt: skip
    if args.sides == "all":
        here = [sys.executable, str(Path(__file__).resolve()), "--unshared-child"]
        out["diagnose, unshared (before)"] = [*here, str(paths["checkpoint"]), "--base", base,
                                              *common]  # fmt: skip
    return out


def unshared_child(argv: list[str]) -> int:
    """diagnose as it ran before the shared base: every arm loads the base itself and runs
    its own generation (the same code, without the model handed from arm to arm)."""
    import ckpt_doctor.smoke as smoke
    from ckpt_doctor import diagnosis
    from ckpt_doctor.cli import main

    own = smoke.smoke_generate

    def alone(*a: Any, model: Any = None, base_results: Any = None, **k: Any) -> Any:
        return own(*a, **k)

    smoke.smoke_generate = alone
    smoke.load_smoke_base = lambda *a, **k: None
    del diagnosis  # imported so that its lazy import of smoke sees the patches
    sys.argv = ["ckpt-doctor", "diagnose", *argv]
    main()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ckpt-doctor-bench/verdict"))
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--template", default="alpaca", help="none: the prompts as they are")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", choices=["all", "product"], default="all")
    ap.add_argument("--out", type=Path, help="write the results JSON here")
    args = ap.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    paths = build(args.workdir, args.n_layers, device=args.device, dim=args.dim)
    cmds = commands(paths, args)
    runs: dict[str, list[Any]] = {k: [] for k in cmds}
    for r in range(args.repeats + 1):  # the first round warms the page cache (not counted)
        for side, cmd in cmds.items():
            m = run_measured(cmd, in_repo=False)
            if m.returncode not in (0, 1):
                log(m.stderr[-3000:])
                raise SystemExit(f"{side} failed with exit code {m.returncode}")
            doc = json.loads(m.stdout)
            log(f"[{r}/{args.repeats}] {side}: {m.wall_s:.2f} s, RssAnon "
                f"{m.peak_rss_anon_mib:.0f} MiB")  # fmt: skip
            if r:
                runs[side].append((m, doc))
    rows, result = [], {}
    smoke_wall = statistics.median(m.wall_s for m, _ in runs["smoke-generate"])
    phases = ("import", "read", "host_to_device", "build", "compile_capture", "checks",
              "prefill", "decode")  # fmt: skip
    for side, got in runs.items():
        wall = statistics.median(m.wall_s for m, _ in got)
        t = {p: statistics.median(d["timings"][p] for _, d in got) for p in phases}
        rss = max(m.peak_rss_anon_mib for m, _ in got)
        rows.append([side, f"{wall:.2f}", f"{wall / smoke_wall:.2f}x",
                     *(f"{t[p]:.2f}" for p in phases), f"{rss:.0f}"])  # fmt: skip
        result[side] = {"median_wall_s": wall, "timings": t, "peak_rss_anon_mib": rss,
                        "walls": [m.wall_s for m, _ in got]}  # fmt: skip
    headers = ["command", "median wall (s)", "/ smoke-generate", *phases, "peak RssAnon (MiB)"]
    table = markdown_table(rows, headers)
    hidden = 256 * ((int(8 * args.dim / 3) + 255) // 256)
    n_params = args.n_layers * (4 * args.dim**2 + 3 * args.dim * hidden) + 2 * 32000 * args.dim
    print(f"Machine: {machine_description()}; load average {load_average()}")
    print(f"Model: {args.n_layers} layers of 7B's shape (dim {args.dim}), "
          f"{n_params / 1e9:.2f}B parameters, fp16 files; device {args.device}; "
          f"{args.prompts} prompts x {args.max_new_tokens} new tokens; median of "
          f"{args.repeats} fresh processes each, sides alternating, page cache warm")  # fmt: skip
    print()
    print(table)
    if args.out:
        write_json(args.out, {"config": vars(args) | {"workdir": str(args.workdir),
                                                       "out": str(args.out)},
                              "results": result, "table": table})  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--unshared-child":
        raise SystemExit(unshared_child(sys.argv[2:]))
    raise SystemExit(main())
