"""CPU decode throughput: ckpt-doctor's reference model vs transformers + PEFT adaption prompt.

Benchmark environment only (not project dependencies): ``pip install transformers peft
accelerate`` into the venv, keeping torch as it is.

One ~134M-parameter LLaMA-Adapter v1 model with random fp32 weights is written in Meta layout
(``consolidated.00.pth`` + ``params.json``) plus an adapter file, then run by both sides:

- ckpt-doctor: ``load_model(open_checkpoint(dir), adapter=..., dtype="float32", gate_fn="raw")``
  and a manual greedy loop over ``Transformer.forward`` with its preallocated KV cache.
- transformers ``LlamaForCausalLM`` with the same weights (q/k rows permuted from Meta's
  interleaved RoPE pairs to HF's rotate-half layout), wrapped by PEFT's adaption prompt with the
  same prompts and gates, and a manual greedy loop with its ``DynamicCache``.

What PEFT's adaption prompt computes, and why its math equals ours with ``gate_fn=raw`` and
per-head gates all equal: benchmarks/hf_peft.py. Parity is checked on exactly that setting, plus
all gates 0 against ckpt-doctor's plain base.

Only the decode steps are timed (the prefill is not), median over repeats, sides alternating.
The roofline is weight streaming: each decode step reads every weight matrix once (the token
embedding only by gathering B rows, so it is left out) plus the KV cache so far; the bandwidth is
measured in the same run as the median ``torch.sum`` over a 1 GiB fp32 tensor.

The report gives the CPU time other processes used during the timed phase. On a small shared box
(2 vCPUs) two-thread BLAS collapses, up to 10x per step, whenever anything else runs;
``--threads 1`` gives steadier numbers there (both sides always share one thread count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import machine_description, markdown_table, write_json
from cpu_probe import OtherLoad, measure_bandwidth, profile_steps
from hf_peft import Decoded, build_hf, decode_hf, set_attn, set_peft_gate, wrap_peft

DEFAULT_DIR = Path("/tmp/ckpt-doctor-bench/decode")
PARITY_TOL = 1e-4
TARGET_SPEEDUP = 1.5


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def ffn_hidden(dim: int, multiple_of: int) -> int:
    h = int(2 * 4 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def build_checkpoint(workdir: Path, cfg: dict[str, Any], seed: int) -> tuple[Path, Path]:
    """Meta dir (consolidated.00.pth + params.json) and adapter.pth; reused when cfg matches."""
    base_dir, adapter_path = workdir / "base", workdir / "adapter.pth"
    stamp = workdir / "build.json"
    want = {"cfg": cfg, "seed": seed, "version": 1}
    try:
        if json.loads(stamp.read_text()) == want and adapter_path.exists():
            return base_dir, adapter_path
    except (OSError, ValueError):
        pass
    stamp.unlink(missing_ok=True)
    base_dir.mkdir(parents=True, exist_ok=True)
    dim, n_layers, vocab = cfg["dim"], cfg["n_layers"], cfg["vocab_size"]
    hidden = ffn_hidden(dim, cfg["multiple_of"])
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    # q/k get a larger std than the rest so that attention is far from uniform: a wrong RoPE
    # layout or scale then shows in the logits instead of hiding under near-constant scores.
    sd: dict[str, torch.Tensor] = {"tok_embeddings.weight": randn(vocab, dim, std=1.0)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = randn(dim, dim, std=0.08)
        sd[p + "attention.wk.weight"] = randn(dim, dim, std=0.08)
        sd[p + "attention.wv.weight"] = randn(dim, dim, std=0.02)
        sd[p + "attention.wo.weight"] = randn(dim, dim, std=0.02)
        sd[p + "feed_forward.w1.weight"] = randn(hidden, dim, std=0.02)
        sd[p + "feed_forward.w2.weight"] = randn(dim, hidden, std=0.02)
        sd[p + "feed_forward.w3.weight"] = randn(hidden, dim, std=0.02)
        sd[p + "attention_norm.weight"] = 1.0 + randn(dim, std=0.1)
        sd[p + "ffn_norm.weight"] = 1.0 + randn(dim, std=0.1)
    sd["norm.weight"] = 1.0 + randn(dim, std=0.1)
    sd["output.weight"] = randn(vocab, dim, std=0.02)
    torch.save(sd, base_dir / "consolidated.00.pth")
    params = {k: cfg[k] for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")}
    (base_dir / "params.json").write_text(json.dumps({**params, "vocab_size": vocab}))

    a_len, a_layer, h = cfg["adapter_len"], cfg["adapter_layer"], cfg["n_heads"]
    adapter: dict[str, torch.Tensor] = {"adapter_query.weight": randn(a_len * a_layer, dim, std=1)}
    for i in range(n_layers):  # upstream writes a gate for every layer; only the top ones train
        value = cfg["gate"] if i >= n_layers - a_layer else 0.0
        adapter[f"layers.{i}.attention.gate"] = torch.full((1, h, 1, 1), float(value))
    torch.save(adapter, adapter_path)
    stamp.write_text(json.dumps(want))
    return base_dir, adapter_path


# --------------------------------------------------------------------------------------------
# Decode loops (only the steps after the prefill are timed)
# --------------------------------------------------------------------------------------------


def decode_ckpt_doctor(model: Any, prompt: torch.Tensor, steps: int) -> Decoded:
    from ckpt_doctor.generate import cpu_tuned

    b = prompt.shape[0]
    with cpu_tuned(model, b):  # what generate() does: weight layout for the batch size
        return _decode_ckpt_doctor(model, prompt, steps)


def _decode_ckpt_doctor(model: Any, prompt: torch.Tensor, steps: int) -> Decoded:
    b, t = prompt.shape
    cache = model.new_cache(b, t + steps)
    tok = model(prompt, 0, cache).argmax(-1)
    out, times = [tok], []
    for s in range(steps):
        t0 = time.perf_counter()
        tok = model(tok[:, None], t + s, cache).argmax(-1)
        times.append(time.perf_counter() - t0)
        out.append(tok)
    return times, torch.stack(out, 1)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--gate", type=float, default=0.3)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--n-heads", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"], help="HF attention impls")
    ap.add_argument("--profile", action="store_true", help="profile even when the target passes")
    args = ap.parse_args(argv)

    import peft
    import transformers

    from ckpt_doctor.loading import load_model
    from ckpt_doctor.reader import open_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "vocab_size": 32000,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "adapter_len": 10,
        "adapter_layer": 8,
        "gate": args.gate,
        "max_seq_len": 512,
    }
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    base_dir, adapter_path = build_checkpoint(args.workdir, cfg, args.seed)
    log(f"checkpoint: {base_dir}, {adapter_path}")

    cd, _ = load_model(
        open_checkpoint(base_dir),
        adapter=open_checkpoint(adapter_path),
        dtype="float32",
        gate_fn="raw",
    )
    cd_base, _ = load_model(open_checkpoint(base_dir), dtype="float32")
    assert cd.args.adapter_layer == cfg["adapter_layer"], cd.args
    assert cd.args.adapter_len == cfg["adapter_len"], cd.args
    sd = torch.load(base_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
    query = torch.load(adapter_path, weights_only=True)["adapter_query.weight"]
    hf_cfg = {**cfg, "ffn_hidden": ffn_hidden(cfg["dim"], cfg["multiple_of"])}
    hf = wrap_peft(build_hf(sd, hf_cfg, args.attn[0]), query, cfg, gate=args.gate)
    del sd
    hf_base = hf.get_base_model()

    n_params = sum(p.numel() for p in cd.parameters())
    streamed = n_params - cd.tok_embeddings.weight.numel() - cd.adapter_query.weight.numel()
    weight_bytes = streamed * 4
    log(f"ckpt-doctor params {n_params / 1e6:.1f}M; streamed per step {weight_bytes / 1e6:.0f} MB")

    # ---- parity: full-sequence fp32 logits on the same tokens
    g = torch.Generator().manual_seed(args.seed + 1)
    parity_tokens = torch.randint(0, cfg["vocab_size"], (2, args.prompt_len), generator=g)
    parity: dict[str, Any] = {}
    with torch.inference_mode():
        t = parity_tokens.shape[1]

        def cd_logits(model: Any) -> torch.Tensor:
            return model(parity_tokens, 0, model.new_cache(2, t), all_logits=True)

        def hf_logits() -> torch.Tensor:
            return hf(input_ids=parity_tokens, use_cache=False).logits.float()

        for attn in args.attn:
            set_attn(hf_base, attn)
            set_peft_gate(hf_base, args.gate)
            ours, theirs = cd_logits(cd), hf_logits()
            parity[f"gate {args.gate}, raw, {attn}"] = (ours - theirs).abs().max().item()
            set_peft_gate(hf_base, 0.0)
            theirs0 = hf_logits()
            base = cd_logits(cd_base)
            parity[f"gate 0 vs base, {attn}"] = (base - theirs0).abs().max().item()
        controls = {
            "logits max |value|": ours.abs().max().item(),
            "adapter effect: gate 0.3 vs gate 0 (HF)": (theirs - theirs0).abs().max().item(),
        }
        cd.prepare(gate_fn="tanh")  # a known-wrong setting must NOT pass the tolerance
        controls["ckpt-doctor tanh gate vs PEFT raw"] = (cd_logits(cd) - theirs).abs().max().item()
        cd.prepare(gate_fn="raw")
        set_peft_gate(hf_base, args.gate)
    parity_ok = all(v <= PARITY_TOL for v in parity.values())
    controls_ok = all(
        controls[k] > PARITY_TOL
        for k in ("adapter effect: gate 0.3 vs gate 0 (HF)", "ckpt-doctor tanh gate vs PEFT raw")
    )
    for k, v in {**parity, **controls}.items():
        log(f"parity {k}: {v:.3e}")

    # ---- decode timing
    bandwidth = measure_bandwidth()
    log(f"bandwidth (torch.sum over 1 GiB fp32): {bandwidth / 1e9:.2f} GB/s")
    timings: dict[str, dict[str, list[float]]] = {}
    step_medians: dict[str, dict[str, float]] = {}  # median single step over all repeats
    agreement: dict[int, float] = {}
    sides = ["ckpt-doctor", *(f"hf+peft {a}" for a in args.attn)]
    with torch.inference_mode(), OtherLoad() as other:
        for batch in args.batches:
            prompt = torch.randint(0, cfg["vocab_size"], (batch, args.prompt_len), generator=g)
            runs: dict[str, list[float]] = {s: [] for s in sides}
            steps_all: dict[str, list[float]] = {s: [] for s in sides}
            seqs: dict[str, torch.Tensor] = {}

            def run(side: str, prompt: torch.Tensor = prompt) -> Decoded:
                if side == "ckpt-doctor":
                    return decode_ckpt_doctor(cd, prompt, args.steps)
                set_attn(hf_base, side.split()[-1])
                return decode_hf(hf, prompt, args.steps)

            for side in sides:  # warm-up run, also gives the greedy sequences
                _, seqs[side] = run(side)
            for r in range(args.repeats):
                for side in sides:
                    step_times, _ = run(side)
                    dt = sum(step_times)
                    runs[side].append(dt)
                    steps_all[side] += step_times
                    log(
                        f"batch {batch} [{r + 1}/{args.repeats}] {side:15s} "
                        f"{batch * args.steps / dt:8.1f} tok/s"
                    )
            timings[str(batch)] = runs
            step_medians[str(batch)] = {s: statistics.median(v) for s, v in steps_all.items()}
            ref = seqs["ckpt-doctor"]
            agreement[batch] = min(
                (seqs[s] == ref).float().mean().item() for s in sides if s != "ckpt-doctor"
            )

    rows, results, targets_ok = [], [], True
    attn_choice: dict[int, str] = {}
    for batch in args.batches:
        runs = timings[str(batch)]
        med = {s: statistics.median(v) for s, v in runs.items()}
        best_hf = min((s for s in sides if s != "ckpt-doctor"), key=lambda s: med[s])
        attn_choice[batch] = best_hf.split()[-1]
        cd_tps = batch * args.steps / med["ckpt-doctor"]
        hf_tps = batch * args.steps / med[best_hf]
        # Roofline: weights once per step plus the KV cache read so far (mean over the steps).
        mean_pos = args.prompt_len + (args.steps + 1) / 2
        kv_bytes = 2 * cfg["n_layers"] * batch * mean_pos * cfg["dim"] * 4
        roof_steps = bandwidth / (weight_bytes + kv_bytes)
        roof_tps = roof_steps * batch
        ratio = cd_tps / hf_tps
        ok = ratio >= TARGET_SPEEDUP
        targets_ok &= ok
        rows.append(
            [
                batch,
                f"{cd_tps:.1f}",
                f"{hf_tps:.1f} ({attn_choice[batch]})",
                f"{ratio:.2f}x",
                f"{roof_tps:.1f}",
                f"{roof_steps:.1f}",
                f"{cd_tps / roof_tps:.0%}",
                f"{hf_tps / roof_tps:.0%}",
                "PASS" if ok else "FAIL",
            ]
        )
        results.append(
            {
                "batch": batch,
                "median_decode_s": med,
                "tokens_per_s": {s: batch * args.steps / v for s, v in med.items()},
                "hf_attention": attn_choice[batch],
                "ratio": ratio,
                "roofline_steps_per_s": roof_steps,
                "roofline_tokens_per_s": roof_tps,
                "fraction_of_roofline": {
                    "ckpt-doctor": cd_tps / roof_tps,
                    "hf+peft": hf_tps / roof_tps,
                },
                "greedy_token_agreement_min": agreement[batch],
                "pass": ok,
                "runs_s": runs,
                "median_step_s": step_medians[str(batch)],
            }
        )

    headers = [
        "batch",
        "ckpt-doctor tok/s",
        "transformers+PEFT tok/s",
        "ratio",
        "roofline tok/s",
        "roofline steps/s",
        "ckpt-doctor of roofline",
        "HF+PEFT of roofline",
        f">= {TARGET_SPEEDUP}x",
    ]
    all_sides = markdown_table(
        [
            [
                b,
                *(f"{b * args.steps / statistics.median(timings[str(b)][s]):.1f}" for s in sides),
                *(f"{b / step_medians[str(b)][s]:.1f}" for s in sides),
                f"{step_medians[str(b)][sides[1]] / step_medians[str(b)]['ckpt-doctor']:.2f}x",
            ]
            for b in args.batches
        ],
        [
            "batch",
            *(f"{s} tok/s" for s in sides),
            *(f"{s} (step median)" for s in sides),
            f"ratio vs {sides[1]} (step median)",
        ],
    )
    versions = (
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )
    lines = [
        "## Decode throughput on CPU: ckpt-doctor vs transformers + PEFT adaption prompt",
        "",
        f"Machine: {machine_description()}",
        f"Libraries: {versions}",
        f"Model: dim {cfg['dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, vocab "
        f"{cfg['vocab_size']}, ffn {ffn_hidden(cfg['dim'], 256)}, {n_params / 1e6:.1f}M params "
        f"fp32; adapter_len {cfg['adapter_len']}, adapter_layer {cfg['adapter_layer']}, all gates "
        f"{args.gate} (raw)",
        f"Decode: prompt {args.prompt_len} tokens (prefill not timed), {args.steps} greedy "
        f"one-token steps with KV cache, median of {args.repeats} repeats, sides alternating; "
        "tok/s = batch x steps / time.",
        f"Other processes' CPU use during timing: {other.cores:.2f} cores on average"
        + (" (the box was shared: timings are noisy)" if other.cores > 0.2 else ""),
        f"Roofline: read bandwidth {bandwidth / 1e9:.2f} GB/s (median torch.sum over 1 GiB fp32); "
        f"bytes per step = {weight_bytes / 1e6:.0f} MB of weights (all but the token embedding) "
        "+ the mean KV cache read.",
        "",
        markdown_table(rows, headers),
        "",
        "All sides (HF+PEFT reported above with the faster attention implementation per batch). "
        "'step median' = batch / the median single decode step over all repeats: an estimate "
        "that contention bursts on a shared box barely move:",
        "",
        all_sides,
        "",
        "Greedy tokens identical between ckpt-doctor and HF+PEFT: "
        + ", ".join(f"batch {b}: {agreement[b]:.1%}" for b in args.batches),
        "",
        f"### Parity (full-sequence fp32 logits, {parity_tokens.shape[0]}x{args.prompt_len} "
        f"tokens; tolerance {PARITY_TOL:g})",
        "",
        *(
            f"- max |ckpt-doctor - HF+PEFT|, {k}: {v:.2e} [{'PASS' if v <= PARITY_TOL else 'FAIL'}]"
            for k, v in parity.items()
        ),
        *(f"- control, {k}: {v:.2e}" for k, v in controls.items()),
        f"- controls exceed the tolerance (the comparison can fail): {controls_ok}",
    ]
    profiles: list[str] = []
    profile_shares: dict[str, dict[str, float]] = {}
    if not targets_ok or args.profile:
        n = 16
        for b in args.batches:
            prompt = torch.randint(0, cfg["vocab_size"], (b, args.prompt_len), generator=g)
            set_attn(hf_base, attn_choice[b])
            with torch.inference_mode():
                for label, fn in (
                    (f"ckpt-doctor, batch {b}", lambda p=prompt: decode_ckpt_doctor(cd, p, n)),
                    (
                        f"transformers+PEFT ({attn_choice[b]}), batch {b}",
                        lambda p=prompt: decode_hf(hf, p, n),
                    ),
                ):
                    text, share = profile_steps(fn, f"{label}, prefill + {n} decode steps")
                    profiles.append(text)
                    profile_shares[label] = share
    passed = parity_ok and controls_ok and targets_ok
    lines += [
        "",
        f"- [{'PASS' if parity_ok else 'FAIL'}] parity <= {PARITY_TOL:g} (gates {args.gate} and 0)",
        *(
            f"- [{'PASS' if r['pass'] else 'FAIL'}] ckpt-doctor >= {TARGET_SPEEDUP}x "
            f"transformers+PEFT at batch {r['batch']} (got {r['ratio']:.2f}x)"
            for r in results
        ),
        "",
        f"Overall: {'PASS' if passed else 'FAIL'}",
        *(["", *profiles] if profiles else []),
    ]
    report = "\n".join(lines)
    print(report)
    out = args.workdir / "decode_cpu.json"
    write_json(
        out,
        {
            "benchmark": "decode_cpu",
            "machine": machine_description(),
            "versions": versions,
            "config": cfg,
            "n_params": n_params,
            "streamed_weight_bytes": weight_bytes,
            "bandwidth_bytes_per_s": bandwidth,
            "parity": parity,
            "parity_controls": controls,
            "parity_pass": parity_ok,
            "other_processes_cores": other.cores,
            "profile_shares": profile_shares,
            "results": results,
            "passed": passed,
            "report_markdown": report,
        },
    )
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
