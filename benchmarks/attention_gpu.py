"""Fused gated attention on a GPU: correctness at 7B shapes, kernel speed, an end-to-end smoke run.

One prepared script for a lent GPU (writes results.json and results.md under --out):

1. Correctness at 7B shapes (32 heads, head_dim 128, adapter_len 10), fp16 and bf16: the fused
   kernels and the same-precision PyTorch reference, each against the reference in fp32; the
   fused error must be <= 2x the reference's.
2. Speed, medians from triton.testing.do_bench, ratios measured in the same run:
   fused vs the PyTorch reference vs "two SDPA calls" (causal SDPA over the tokens plus SDPA over
   the adapter prompt, gated and added: what everyone else does).
   - prefill, B=1, T = 512, 2048, 4096: TFLOP/s, and the fused time over SDPA on the token
     part alone (target <= 1.1 at T >= 2048);
   - decode, B = 1, 8, 32, L = 512, 2048, 8192: KV-read GB/s (K and V of L positions), the
     fraction of the card's HBM peak (target >= 50% at L >= 4096), and fused vs reference
     (>= 2x) and vs two SDPA calls (>= 1.2x) at B=8, L=2048.
3. End to end: ckpt-doctor's Transformer with random 7B-shaped fp16 weights (32 layers, dim
   4096, ffn 11008, vocab 32000, 30 adapted layers), fused attention, static KV cache, greedy
   batch-1 decode; tokens/s against the weight-streaming roofline (weight bytes / HBM peak),
   eager and with generate.decode_step's CUDA graph, and generate() itself (smoke-generate's
   loop, prefill and graph capture included).

``--dry-run`` runs every step at toy shapes on the CPU under TRITON_INTERPRET=1 (a test does),
so the script is known to work before GPU time is spent on it.
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

if "--dry-run" in sys.argv:  # before Triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from common import markdown_table

from ckpt_doctor.tokenizer import Tokenizer

# HBM peak by card name (vendor datasheets, bytes/s); unknown cards fall back to a measured copy.
# First match wins, so the PCIe/NVL variants come before plain "H100" (the SXM part).
HBM_PEAK = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
}


def hbm_peak(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return measured_copy_bandwidth(device), "measured copy (CPU dry run)"
    name = torch.cuda.get_device_name(device)
    for key, peak in HBM_PEAK.items():
        if key in name:
            return peak, f"{name} datasheet"
    return measured_copy_bandwidth(device), f"{name}: measured copy (not in the table)"


def measured_copy_bandwidth(device: torch.device) -> float:
    x = torch.empty(256 * 2**20 // 4 if device.type == "cuda" else 2**22, device=device)
    y = torch.empty_like(x)
    seconds = bench(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / seconds


def bench(fn: Any, device: torch.device) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(b: int, h: int, t: int, length: int, hd: int, la: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    x = {
        "q": rnd(b, h, t, hd),
        "k": rnd(b, h, length, hd),
        "v": rnd(b, h, length, hd),
        "ak": rnd(h, la, hd),
        "av": rnd(h, la, hd),
    }
    x = {n: v.to(dtype) for n, v in x.items()}
    x["gate"] = torch.linspace(-1.5, 1.5, h, device=device)
    return x


def call(fn: Any, x: dict, start: int | torch.Tensor) -> torch.Tensor:
    return fn(
        x["q"], x["k"], x["v"], start=start, adapter_k=x["ak"], adapter_v=x["av"], gate=x["gate"]
    )


def two_sdpa(x: dict, start: int) -> torch.Tensor:
    """What everyone else does: causal SDPA over the tokens, SDPA over the prompt, gate, add."""
    q = x["q"]
    b, h, t, _ = q.shape
    keys, values = x["k"][:, :, : start + t], x["v"][:, :, : start + t]
    if t > 1 and start == 0:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    elif t > 1:
        mask = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(start)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, keys, values)
    ak = x["ak"].unsqueeze(0).expand(b, -1, -1, -1)
    av = x["av"].unsqueeze(0).expand(b, -1, -1, -1)
    adapter = F.scaled_dot_product_attention(q, ak, av)
    return out + x["gate"].view(1, h, 1, 1).to(q.dtype) * adapter


def correctness(shape: dict, dtypes: list, device) -> list[dict]:
    """Max |error| against the fp32 reference, fused and same-precision reference. The last
    case is the CUDA-graph decode: the position read from device memory, over a cache twice as
    long whose positions past it hold NaN (a kernel that reads them poisons its output)."""
    from ckpt_doctor.kernels import gated_attention, gated_attention_reference

    rows = []
    length = shape["l"]
    cases = [("prefill", 1, shape["t"], 0, 0), ("decode", 8, 1, length - 1, 0),
             ("decode, position in memory", 8, 1, length - 1, length)]  # fmt: skip
    for dtype in dtypes:
        for kind, b, t, start, extra in cases:
            x = inputs(b, shape["h"], t, start + t + extra, shape["hd"], shape["la"], dtype, device)
            x["k"][:, :, start + t :] = float("nan")
            x["v"][:, :, start + t :] = float("nan")
            visible = {**x, "k": x["k"][:, :, : start + t], "v": x["v"][:, :, : start + t]}
            oracle = call(gated_attention_reference, {**visible, **_f32(visible)}, start)
            ref_err = (call(gated_attention_reference, visible, start).float() - oracle).abs().max()
            at = torch.tensor([start], device=device) if extra else start
            fused_err = (call(gated_attention, x, at).float() - oracle).abs().max()
            ok = bool(fused_err <= 2 * ref_err)
            rows.append(
                {"dtype": str(dtype).removeprefix("torch."), "case": f"{kind} B={b} T={t} "
                 f"start={start}", "fused_err": float(fused_err), "ref_err": float(ref_err),
                 "pass": ok}
            )  # fmt: skip
    return rows


def _f32(x: dict) -> dict:
    return {n: v.float() for n, v in x.items() if n != "gate"}


def speed(shape: dict, dtype, device, peak: float) -> tuple[list[dict], list[dict]]:
    from ckpt_doctor.kernels import gated_attention_reference

    gated_attention = fused_unchecked()
    h, hd, la = shape["h"], shape["hd"], shape["la"]
    prefill = []
    for t in shape["prefill_t"]:
        x = inputs(1, h, t, t, hd, la, dtype, device)
        times = {
            "fused": bench(lambda x=x: call(gated_attention, x, 0), device),
            "reference": bench(lambda x=x: call(gated_attention_reference, x, 0), device),
            "two SDPA": bench(lambda x=x: two_sdpa(x, 0), device),
            "SDPA tokens only": bench(
                lambda x=x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True),
                device,
            ),
        }
        flops = 4 * h * hd * (t * (t + 1) / 2 + t * la)  # QK^T and PV, causal half + adapter
        prefill.append(
            {"T": t, **{f"{k} ms": v * 1e3 for k, v in times.items()},
             "fused TFLOP/s": flops / times["fused"] / 1e12,
             "fused / SDPA tokens only": times["fused"] / times["SDPA tokens only"]}
        )  # fmt: skip
    decode = []
    for b in shape["decode_b"]:
        for length in shape["decode_l"]:
            x = inputs(b, h, 1, length, hd, la, dtype, device)
            start = length - 1
            times = {
                "fused": bench(lambda x=x, s=start: call(gated_attention, x, s), device),
                "reference": bench(
                    lambda x=x, s=start: call(gated_attention_reference, x, s), device
                ),
                "two SDPA": bench(lambda x=x, s=start: two_sdpa(x, s), device),
            }
            kv_bytes = 2 * b * h * length * hd * x["k"].element_size()
            gbs = kv_bytes / times["fused"]
            decode.append(
                {"B": b, "L": length, **{f"{k} us": v * 1e6 for k, v in times.items()},
                 "fused GB/s": gbs / 1e9, "of HBM peak": gbs / peak,
                 "vs reference": times["reference"] / times["fused"],
                 "vs two SDPA": times["two SDPA"] / times["fused"]}
            )  # fmt: skip
    return prefill, decode


def fused_unchecked() -> Any:
    """The fused kernels as the model calls them (model.ATTENTION): inputs checked once, not
    on every call (correctness() has run them checked)."""
    from ckpt_doctor.model import ATTENTION

    return ATTENTION["fused"]


def splits_sweep(shape: dict, dtype, device, peak: float) -> list[dict]:
    """Decode KV-read bandwidth for launch.PROGRAMS_PER_SM = 2, 4, 8 (how many split-KV
    programs per SM the split count aims for): the data to choose it from."""
    from ckpt_doctor.kernels import launch

    fused, default = fused_unchecked(), launch.PROGRAMS_PER_SM
    rows = []
    for b, length in [(1, max(shape["decode_l"])), (8, shape["l"])]:
        x = inputs(b, shape["h"], 1, length, shape["hd"], shape["la"], dtype, device)
        kv_bytes = 2 * b * shape["h"] * length * shape["hd"] * x["k"].element_size()
        row: dict[str, Any] = {"B": b, "L": length}
        try:
            for per_sm in (2, 4, 8):
                launch.PROGRAMS_PER_SM = per_sm
                seconds = bench(lambda x=x, s=length - 1: call(fused, x, s), device)
                row[f"{per_sm}/SM of HBM peak"] = kv_bytes / seconds / peak
        finally:
            launch.PROGRAMS_PER_SM = default
        rows.append(row)
    return rows


def end_to_end(cfg: dict, dtype, device, peak: float, steps: int) -> dict:
    from ckpt_doctor.model import ModelArgs, Transformer

    args = ModelArgs(
        dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["h"], vocab_size=cfg["vocab"],
        ffn_hidden=cfg["ffn"], max_seq_len=cfg["prompt"] + steps + 8,
        adapter_len=cfg["la"], adapter_layer=cfg["adapter_layer"],
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    for name, p in model.named_parameters():  # random but tame: N(0, 0.02), norms 1, gates 0.3
        if not name.endswith("norm.weight"):
            p.data.normal_(0, 0.02)
    for i in args.adapted_layers:
        model.layers[i].attention.gate.data.fill_(0.3)
    model.eval()
    model.prepare(gate_fn="raw")
    prompt = torch.randint(3, args.vocab_size, (1, cfg["prompt"]), device=device)
    out: dict[str, Any] = {}
    runs = {"fused": ("fused", False), "fused + CUDA graph": ("fused", True)}
    runs["reference"] = ("reference", False)
    ids = {}
    for label, (attention, graph) in runs.items():
        model.set_attention(attention)
        try:
            seconds, ids[label] = greedy(model, prompt, steps, graph=graph)
        except Exception as err:  # a failed capture is a result too; the others still run
            out[f"{label} error"] = f"{type(err).__name__}: {err}"[:300]
            continue
        out[f"{label} tok/s"] = steps / seconds
    try:  # the product's own loop: what `smoke-generate` on this model would do
        model.set_attention("fused")
        seconds, made = smoke_path(model, cfg["prompt"], steps)
        out["generate() tok/s"] = made / seconds
    except Exception as err:
        out["generate() error"] = f"{type(err).__name__}: {err}"[:300]
    for label in ids:
        same = (ids[label] == ids["fused"]).float().mean().item() if "fused" in ids else None
        out[f"{label} same tokens as fused"] = same
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    out["weight GB"] = weight_bytes / 1e9
    out["roofline tok/s"] = peak / weight_bytes
    best = max(out.get("fused tok/s", 0.0), out.get("fused + CUDA graph tok/s", 0.0))
    out["fused of roofline"] = best / out["roofline tok/s"]
    out["generate() of roofline"] = out.get("generate() tok/s", 0.0) / out["roofline tok/s"]
    return out


@torch.inference_mode()
def greedy(
    model: Any, prompt: torch.Tensor, steps: int, *, graph: bool
) -> tuple[float, torch.Tensor]:
    """Prefill, then ``steps`` greedy one-token steps; seconds for the steps and the ids.

    The step is generate.decode_step, the one smoke-generate uses: with ``graph`` captured once
    as a CUDA graph (on the CPU dry run, its static form runs eagerly). An untimed pass comes
    first, so that no kernel is compiled or tuned inside the timed one."""
    from ckpt_doctor.generate import decode_step

    device = prompt.device
    cache = model.new_cache(1, model.args.max_seq_len)
    step = decode_step(model, cache, graph=graph)  # before the prefill: warm-up writes
    for _timed in (False, True):
        tok = model(prompt, 0, cache).argmax(-1)
        start = prompt.shape[1]
        out = []
        _sync(device)
        t0 = time.perf_counter()
        for s in range(steps):
            tok = step(tok, start + s).argmax(-1)
            out.append(tok)
        _sync(device)
    return time.perf_counter() - t0, torch.stack(out, 1)


class DigitTokenizer(Tokenizer):
    """Just enough tokenizer to run generate() on a random model: one id per digit."""

    def __init__(self, vocab_size: int) -> None:
        self.path, self.vocab_size = Path("digits"), vocab_size
        self.bos_id, self.eos_id = 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + int(c) for c in text]

    def decode(self, ids: Any) -> str:
        return " ".join(map(str, ids))


def smoke_path(model: Any, prompt_len: int, steps: int) -> tuple[float, int]:
    """generate() as smoke-generate runs it (loop detector, P(eos), graph capture included):
    seconds and tokens generated for one prompt."""
    from ckpt_doctor.generate import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=steps, template="none", stop_on_loop=False)
    device = model.tok_embeddings.weight.device
    _sync(device)
    t0 = time.perf_counter()
    prompt = "".join(str(i % 10) for i in range(prompt_len - 1))  # + bos
    (r,) = generate(model, DigitTokenizer(model.args.vocab_size), [prompt], config=config)
    _sync(device)
    return time.perf_counter() - t0, len(r.generated_ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    """common.markdown_table over dict rows, floats to 3 significant digits (errors are ~1e-3)."""
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else v  # noqa: E731
    return markdown_table([[fmt(r[k]) for k in keys] for r in rows], keys)


SHAPES_7B = {
    "h": 32, "hd": 128, "la": 10, "t": 512, "l": 2048,
    "prefill_t": [512, 2048, 4096], "decode_b": [1, 8, 32], "decode_l": [512, 2048, 8192],
    "dim": 4096, "n_layers": 32, "ffn": 11008, "vocab": 32000, "adapter_layer": 30, "prompt": 32,
}  # fmt: skip
SHAPES_DRY = {
    "h": 2, "hd": 32, "la": 10, "t": 24, "l": 70,
    "prefill_t": [24], "decode_b": [2], "decode_l": [70],
    "dim": 64, "n_layers": 2, "ffn": 128, "vocab": 100, "adapter_layer": 1, "prompt": 5,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/attention_gpu")))
    ap.add_argument("--dry-run", action="store_true", help="toy shapes on the CPU interpreter")
    ap.add_argument("--steps", type=int, default=128, help="end-to-end decode steps")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    shape = SHAPES_DRY if dry else SHAPES_7B
    peak, peak_source = hbm_peak(device)
    # bf16 is wrong in the interpreter; the dry run checks fp16 (and fp32 for the model)
    dtypes = [torch.float16] if dry else [torch.float16, torch.bfloat16]
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"device {device}, HBM peak {peak / 1e9:.0f} GB/s ({peak_source})")
    result: dict[str, Any] = {"device": _device_name(device), "hbm_peak_GBs": peak / 1e9}
    result["hbm_peak_source"] = peak_source
    result["correctness"] = correctness(shape, dtypes, device)
    log(table(result["correctness"]))
    result["prefill"], result["decode"] = speed(shape, torch.float16, device, peak)
    log(table(result["prefill"]))
    log(table(result["decode"]))
    result["decode_splits"] = splits_sweep(shape, torch.float16, device, peak)
    log(table(result["decode_splits"]))
    e2e_dtype = torch.float32 if dry else torch.float16
    steps = 4 if dry else args.steps
    result["end_to_end"] = end_to_end(shape, e2e_dtype, device, peak, steps)
    log(json.dumps(result["end_to_end"], indent=1))
    result["world"] = world_check(device, prompts=3 if dry else None)
    log(table([result["world"]]))
    result["targets"] = targets(result, dry=dry)
    result["versions"] = versions()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    md = "\n\n".join(
        [f"Device: {result['device']}; HBM peak {peak / 1e9:.0f} GB/s ({peak_source})",
         table(result["correctness"]), table(result["prefill"]), table(result["decode"]),
         table(result["decode_splits"]), table([result["end_to_end"]]), table([result["world"]]),
         table(result["targets"]), json.dumps(result["versions"])]
    )  # fmt: skip
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    return 0 if all(t["pass"] for t in result["targets"]) or dry else 1


def world_check(device: torch.device, *, prompts: int | None) -> dict[str, Any]:
    """smoke-generate's own path (smoke.smoke_generate) on the fixture world: the trained
    checkpoint, fp32, on ``device`` with the fused kernels (and, on CUDA, the graph-captured
    step) against the CPU reference path; the same tokens and eos on every held-out prompt."""
    from ckpt_doctor.reader import open_checkpoint
    from ckpt_doctor.smoke import smoke_generate

    world = Path(__file__).resolve().parents[1] / "fixtures" / "world"
    held_out = json.loads((world / "prompts.json").read_text())["held_out"][:prompts]
    runs = {}
    for where, attention in (("cpu", "reference"), (device.type, "fused")):
        with (
            open_checkpoint(world / "base") as base,
            open_checkpoint(world / "checkpoint-4.pth") as full,
        ):
            report = smoke_generate(
                base, full=full, prompts=held_out, dtype="float32", device=where,
                attention=attention,
            )  # fmt: skip
        runs[where] = (report, [r.generated_ids for r in report.results])
    (ref, ref_ids), (fused, fused_ids) = runs["cpu"], runs[device.type]
    same = sum(a == b for a, b in zip(ref_ids, fused_ids, strict=True))
    return {
        "prompts": len(held_out),
        "fused on": f"{fused.device}, CUDA graph {fused.cuda_graph}",
        "same tokens as CPU reference": same,
        "eos (fused)": sum(r.outcome == "eos" for r in fused.results),
        "eos (CPU reference)": sum(r.outcome == "eos" for r in ref.results),
    }


def targets(r: dict, *, dry: bool) -> list[dict]:
    """The issue's GPU targets, each with the number it was judged on."""
    out = [{"target": "fused error <= 2x reference error (fp16, bf16)",
            "value": max(c["fused_err"] / max(c["ref_err"], 1e-30) for c in r["correctness"]),
            "pass": all(c["pass"] for c in r["correctness"])}]  # fmt: skip
    world = r["world"]
    same = world["same tokens as CPU reference"]
    out.append({"target": "fixture world: smoke-generate fused = CPU reference, every prompt",
                "value": same / world["prompts"], "pass": same == world["prompts"]})  # fmt: skip
    if dry:
        return out
    d = {(x["B"], x["L"]): x for x in r["decode"]}
    long = [x["of HBM peak"] for x in r["decode"] if x["L"] >= 4096]
    pre = [x["fused / SDPA tokens only"] for x in r["prefill"] if x["T"] >= 2048]
    e2e = r["end_to_end"]["fused of roofline"]
    out += [
        {"target": "decode B=8 L=2048 fused vs reference >= 2x",
         "value": d[8, 2048]["vs reference"], "pass": d[8, 2048]["vs reference"] >= 2},
        {"target": "decode B=8 L=2048 fused vs two SDPA >= 1.2x",
         "value": d[8, 2048]["vs two SDPA"], "pass": d[8, 2048]["vs two SDPA"] >= 1.2},
        {"target": "decode KV read >= 50% HBM peak at L >= 4096 (worst)",
         "value": min(long), "pass": min(long) >= 0.5},
        {"target": "prefill fused / SDPA tokens only <= 1.1 at T >= 2048 (worst)",
         "value": max(pre), "pass": max(pre) <= 1.1},
        {"target": "end-to-end 7B batch 1 >= 50% of roofline tok/s",
         "value": e2e, "pass": e2e >= 0.5},
    ]  # fmt: skip
    return out


def versions() -> dict[str, Any]:
    """torch and Triton versions, and the prefill config the autotuner picked for each key."""
    import triton
    from ckpt_doctor.kernels import triton_attention as ta

    picked = getattr(ta.gated_prefill_kernel, "cache", {})
    return {"torch": torch.__version__, "triton": triton.__version__,
            "prefill autotune": {str(k): str(v) for k, v in picked.items()}}  # fmt: skip


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU (TRITON_INTERPRET=1 dry run)"


if __name__ == "__main__":
    raise SystemExit(main())
