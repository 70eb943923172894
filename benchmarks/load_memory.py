"""Peak anonymous memory of loading a ~2 GiB fp16 Meta-format base for smoke generation.

Each measured run is a child process (this script with ``--child``) whose RssAnon is sampled by
``common.run_measured``: load the base, then one prefill of 16 tokens and 8 greedy decode steps
with the KV cache (the work of smoke generation), for two dtypes:

- float32: what ``--dtype auto`` picks on the CPU; the fp16 file is converted on load.
- float16: the file's dtype, kept as is.

Sides:

- ckpt-doctor: ``load_model(open_checkpoint(dir), dtype=D)``. Parameters are assigned tensors
  made from the reader's memory map, so fp16 weights stay file-backed (page cache, not RssAnon)
  and fp32 weights are converted one tensor at a time. Then, as generate() does for one
  prompt, the weights are laid out column-major for batch-1 decoding: one layer's group at a
  time, into anonymous memory (so fp16 ends near 1x the weight bytes too).
- naive: ``torch.load(consolidated.00.pth)`` without mmap, then ckpt-doctor's ``Transformer``
  built on the CPU in dtype D (default dtype switched for construction, so no fp32 detour for
  fp16) and ``load_state_dict(sd, strict=False)`` copying the weights in, as upstream
  example.py does; same forward steps.

The ratio is peak RssAnon / the loaded model's parameter bytes in dtype D (sum of numel x
element size over ``model.parameters()``: ~the file size for fp16, twice it for fp32).
The checkpoint is common.py's ``base.pth`` hard-linked as ``consolidated.00.pth`` when it exists
with the expected shapes, else one written here (dim 2048, 18 layers, 16 heads, vocab 32000).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import machine_description, markdown_table, run_measured, write_json

DEFAULT_DIR = Path("/tmp/ckpt-doctor-bench/load")
SHARED_BASE = Path("/tmp/ckpt-doctor-bench/base.pth")
PARAMS = {"dim": 2048, "n_layers": 18, "n_heads": 16, "vocab_size": 32000, "multiple_of": 256}
PARAMS["norm_eps"] = 1e-5
TARGET_RATIO = 1.3
PREFILL, STEPS = 16, 8
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def ffn_hidden(dim: int, multiple_of: int) -> int:
    h = int(2 * 4 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    dim, vocab, hidden = PARAMS["dim"], PARAMS["vocab_size"], ffn_hidden(PARAMS["dim"], 256)
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            shapes[f"{p}attention.{w}.weight"] = (dim, dim)
        shapes[p + "feed_forward.w1.weight"] = (hidden, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, dim)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (vocab, dim)
    return shapes


def shared_base_fits() -> bool:
    """common.py's base.pth is a flat fp16 Meta-named state dict; reuse it if the shapes match."""
    try:
        manifest = json.loads((SHARED_BASE.parent / "manifest.json").read_text())
        have = {k: tuple(v) for k, v in manifest["base_shapes"].items()}
        return SHARED_BASE.is_file() and have == expected_shapes() and manifest["seed"] == 0
    except (OSError, ValueError, KeyError):
        return False


def build_own(path: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in expected_shapes().items():
        if len(shape) == 1:
            sd[name] = (1.0 + 0.05 * torch.randn(shape, generator=g)).half()
        else:  # random rows tiled: cheap to make, and the values do not matter for memory
            block = (0.02 * torch.randn((min(shape[0], 256), shape[1]), generator=g)).half()
            sd[name] = block.repeat((shape[0] + block.shape[0] - 1) // block.shape[0], 1)[
                : shape[0]
            ].clone()
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)


def prepare_dir(workdir: Path) -> tuple[Path, str]:
    meta = workdir / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "params.json").write_text(json.dumps(PARAMS))
    target = meta / "consolidated.00.pth"
    if target.exists():
        return meta, "reused"
    if shared_base_fits():
        try:
            os.link(SHARED_BASE, target)
            return meta, f"hard link of {SHARED_BASE}"
        except OSError:
            pass
    build_own(target)
    return meta, "built here"


# --------------------------------------------------------------------------------------------
# The child: one load + smoke forward, reporting what it did as JSON on stdout
# --------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(side: str, dtype_name: str, meta: Path) -> None:
    import torch

    from ckpt_doctor.generate import cpu_tuned
    from ckpt_doctor.loading import load_model
    from ckpt_doctor.model import ModelArgs, Transformer, ffn_hidden_size
    from ckpt_doctor.reader import open_checkpoint

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    if side == "ckpt-doctor":
        model, _ = load_model(open_checkpoint(meta), dtype=dtype_name)
    else:
        sd = torch.load(meta / "consolidated.00.pth", map_location="cpu", weights_only=True)
        p = json.loads((meta / "params.json").read_text())
        args = ModelArgs(
            dim=p["dim"],
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            vocab_size=p["vocab_size"],
            ffn_hidden=ffn_hidden_size(p["dim"], p["multiple_of"]),
            norm_eps=p["norm_eps"],
        )
        torch.set_default_dtype(dtype)
        try:
            model = Transformer(args)
        finally:
            torch.set_default_dtype(torch.float32)
        model.load_state_dict(sd, strict=False)  # copies (and converts) into the module
        model.eval()
        model.prepare()
    load_s = time.perf_counter() - t0
    rss_after_load = status_kib("RssAnon")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    prompt = torch.randint(0, model.args.vocab_size, (1, PREFILL), generator=torch.Generator())
    t1 = time.perf_counter()
    # As generate() does for one prompt: weights laid out column-major for batch-1 decoding
    # (a copy, one layer's group at a time, of weights that may have been file-mapped).
    with torch.inference_mode(), cpu_tuned(model, 1):
        cache = model.new_cache(1, PREFILL + STEPS)
        tok = model(prompt, 0, cache).argmax(-1)
        tokens = [int(tok)]
        for s in range(STEPS):
            tok = model(tok[:, None], PREFILL + s, cache).argmax(-1)
            tokens.append(int(tok))
    json.dump(
        {
            "side": side,
            "dtype": dtype_name,
            "weight_bytes": weight_bytes,
            "load_s": load_s,
            "forward_s": time.perf_counter() - t1,
            "rss_anon_after_load_kib": rss_after_load,
            "rss_anon_end_kib": status_kib("RssAnon"),
            "rss_file_end_kib": status_kib("RssFile"),
            "vm_hwm_kib": status_kib("VmHWM"),
            "tokens": tokens,
        },
        sys.stdout,
    )


# --------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--child", choices=["ckpt-doctor", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--meta", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.dtype, args.meta)
        return 0

    meta, origin = prepare_dir(args.workdir)
    shard = meta / "consolidated.00.pth"
    file_bytes = shard.stat().st_size
    print(f"checkpoint: {shard} ({origin}, {file_bytes / MIB:.0f} MiB)", file=sys.stderr)
    with open(shard, "rb", buffering=0) as f:  # warm the page cache: no cold I/O in any run
        while f.read(16 * MIB):
            pass

    sides = ["ckpt-doctor", "naive"]
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for dtype in args.dtypes:
        for r in range(args.repeats):
            for side in sides:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side]
                m = run_measured([*cmd, "--dtype", dtype, "--meta", str(meta)])
                key = f"{side} {dtype}"
                res = results.setdefault(key, {"side": side, "dtype": dtype, "runs": []})
                if m.returncode != 0:
                    errors.append(f"{key}: exit {m.returncode}: {m.stderr.strip()[-1500:]}")
                    continue
                info = json.loads(m.stdout)
                info.update(peak_rss_anon_mib=m.peak_rss_anon_mib, wall_s=m.wall_s)
                res["runs"].append(info)
                print(
                    f"[{r + 1}/{args.repeats}] {key:20s} peak RssAnon {m.peak_rss_anon_mib:8.1f} "
                    f"MiB  weights {info['weight_bytes'] / MIB:8.1f} MiB  load {info['load_s']:.1f}"
                    f" s  forward {info['forward_s']:.1f} s  wall {m.wall_s:.1f} s",
                    file=sys.stderr,
                )

    rows, verdicts, passed = [], [], not errors
    for res in results.values():
        runs = res["runs"]
        if not runs:
            passed = False
            continue
        peak = statistics.median(r["peak_rss_anon_mib"] for r in runs)
        weights = runs[0]["weight_bytes"] / MIB
        ratio = peak / weights
        res.update(peak_rss_anon_mib=peak, weight_mib=weights, ratio=ratio)
        is_target = res["side"] == "ckpt-doctor"
        ok = ratio <= TARGET_RATIO
        if is_target:
            passed &= ok
            verdicts.append(
                f"- [{'PASS' if ok else 'FAIL'}] ckpt-doctor, {res['dtype']}: peak RssAnon <= "
                f"{TARGET_RATIO}x weight bytes (got {ratio:.3f}x)"
            )
        rows.append(
            [
                res["dtype"],
                res["side"],
                f"{peak:.0f}",
                f"{weights:.0f}",
                f"{ratio:.3f}x",
                f"{statistics.median(r['rss_anon_after_load_kib'] for r in runs) / 1024:.0f}",
                f"{statistics.median(r['vm_hwm_kib'] for r in runs) / 1024:.0f}",
                f"{statistics.median(r['load_s'] for r in runs):.1f}",
                f"{statistics.median(r['forward_s'] for r in runs):.1f}",
                ("PASS" if ok else "FAIL") if is_target else "(baseline)",
            ]
        )
    same_tokens = {
        dtype: results[f"ckpt-doctor {dtype}"]["runs"][0]["tokens"]
        == results[f"naive {dtype}"]["runs"][0]["tokens"]
        for dtype in args.dtypes
        if results.get(f"ckpt-doctor {dtype}", {}).get("runs")
        and results.get(f"naive {dtype}", {}).get("runs")
    }
    headers = [
        "dtype",
        "side",
        "peak RssAnon MiB",
        "weight MiB (in dtype)",
        "ratio",
        "RssAnon after load MiB",
        "VmHWM MiB",
        "load s",
        "forward s",
        f"<= {TARGET_RATIO}x",
    ]
    report = "\n".join(
        [
            "## Loading a 2 GiB fp16 Meta base for smoke generation: peak RssAnon",
            "",
            f"Machine: {machine_description()}",
            f"Checkpoint: {shard} ({origin}), {file_bytes / MIB:.0f} MiB fp16; dim "
            f"{PARAMS['dim']}, {PARAMS['n_layers']} layers, {PARAMS['n_heads']} heads, vocab "
            f"{PARAMS['vocab_size']}",
            f"Each run: a child process; load, then a {PREFILL}-token prefill and {STEPS} greedy "
            "decode steps with the KV cache. Peak RssAnon sampled every ~1 ms from the parent "
            f"(median of {args.repeats}). Ratio = peak RssAnon / the loaded parameters' bytes in "
            "that dtype. VmHWM (the child's own peak RSS, page cache maps included) is shown "
            "for transparency: fp16 weights that stay memory-mapped count there, not in RssAnon.",
            "",
            markdown_table(rows, headers),
            "",
            "Same greedy tokens, ckpt-doctor vs naive: "
            + ", ".join(f"{d}: {v}" for d, v in same_tokens.items()),
            "",
            *verdicts,
            *(f"- error: {e}" for e in errors),
            "",
            f"Overall: {'PASS' if passed else 'FAIL'}",
        ]
    )
    print(report)
    out = args.workdir / "load_memory.json"
    write_json(
        out,
        {
            "benchmark": "load_memory",
            "machine": machine_description(),
            "checkpoint": str(shard),
            "checkpoint_origin": origin,
            "file_bytes": file_bytes,
            "results": results,
            "same_tokens": same_tokens,
            "errors": errors,
            "passed": passed,
            "report_markdown": report,
        },
    )
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
