"""End-to-end decode on a GPU: ckpt-doctor's model with random 7B-shaped fp16 weights (32 layers,
dim 4096, FFN 11008, vocab 32000, 30 adapted layers, gates 0.3), greedy, static KV cache.

- batch 1: eager reference, eager fused attention only, eager fused (attention, residual +
  RMSNorm, SwiGLU, RoPE + cache write), fused with generate.decode_step's CUDA graph, and
  generate() itself (smoke-generate's loop); tokens/s against the weight-streaming roofline
  (streamed weight bytes / HBM peak);
- batch 1, 8, 32: fused + CUDA graph against HF transformers + PEFT's adaption prompt on the same
  weights, measured in the same run (when transformers / peft are installed; otherwise the rows
  say so);
- a torch.profiler trace of the graph-captured batch-1 step, with and without the fused
  steps around the GEMMs: which kernels the time goes to, and how much of it is not GEMM/GEMV.

Called by attention_gpu.py (``run``); on the CPU dry run the same code runs at toy shapes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hf_peft
import torch
from gpu_common import failed, sync

from ckpt_doctor.tokenizer import Tokenizer

MATMUL_WORDS = ("gemm", "gemv", "xmma", "cutlass", "cublas", "matmul", "sm90_", "sm80_", "addmm")
OUR_KERNELS = ("gated_prefill", "decode_partial", "decode_combine", "add_rmsnorm", "swiglu",
               "rope_cache")  # fmt: skip


def random_model(cfg: dict, dtype: torch.dtype, device: torch.device, max_len: int) -> Any:
    from ckpt_doctor.model import ModelArgs, Transformer

    args = ModelArgs(
        dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["h"], vocab_size=cfg["vocab"],
        ffn_hidden=cfg["ffn"], max_seq_len=max_len, adapter_len=cfg["la"],
        adapter_layer=cfg["adapter_layer"],
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
    return model


def attention_only(model: Any) -> None:
    """The fused attention with the reference steps around it (the fusions' effect)."""
    from ckpt_doctor.kernels.reference import (
        add_rmsnorm_reference,
        rope_and_cache_reference,
        swiglu_reference,
    )

    model.set_attention("fused")
    model.add_norm = add_rmsnorm_reference
    for layer in model.layers:
        layer.attention.rope_write = rope_and_cache_reference
        layer.feed_forward.act = swiglu_reference


@torch.inference_mode()
def greedy(model: Any, prompt: torch.Tensor, steps: int, *, graph: bool) -> tuple[float, Any]:
    """Prefill, then ``steps`` greedy one-token steps through generate.decode_step (the step
    smoke-generate uses; with ``graph`` captured once as a CUDA graph); seconds for the steps
    and the ids. An untimed pass first, so that nothing compiles inside the timed one."""
    from ckpt_doctor.generate import decode_step

    device = prompt.device
    cache = model.new_cache(prompt.shape[0], model.args.max_seq_len)
    step = decode_step(model, cache, graph=graph)  # before the prefill: warm-up writes
    for _timed in (False, True):
        tok = model(prompt, 0, cache).argmax(-1)
        start = prompt.shape[1]
        out = []
        sync(device)
        t0 = time.perf_counter()
        for s in range(steps):
            tok = step(tok, start + s).argmax(-1)
            out.append(tok)
        sync(device)
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
    sync(device)
    t0 = time.perf_counter()
    prompt = "".join(str(i % 10) for i in range(prompt_len - 1))  # + bos
    (r,) = generate(model, DigitTokenizer(model.args.vocab_size), [prompt], config=config)
    sync(device)
    return time.perf_counter() - t0, len(r.generated_ids)


def streamed_bytes(model: Any) -> int:
    """Weight bytes one decode step reads: all but the token embedding (B rows gathered)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    return total - emb.numel() * emb.element_size()


def run(cfg: dict, dtype: torch.dtype, device: torch.device, peak: float, steps: int) -> dict:
    """Every row of the decode table; a failing path becomes an ``... error`` entry."""
    max_len = cfg["prompt"] + steps + 8
    model = random_model(cfg, dtype, device, max_len)
    roof = peak / streamed_bytes(model)
    out: dict[str, Any] = {"weight GB": streamed_bytes(model) / 1e9, "roofline tok/s (B=1)": roof}
    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = {b: torch.randint(3, cfg["vocab"], (b, cfg["prompt"]), generator=g).to(device)
               for b in cfg["batches"]}  # fmt: skip
    ids: dict[str, Any] = {}
    one = prompts[1]
    variants = {"reference": ("reference", False), "fused attention only": ("attention", False),
                "fused": ("fused", False), "fused + CUDA graph": ("fused", True)}  # fmt: skip
    for label, (how, graph) in variants.items():
        try:
            attention_only(model) if how == "attention" else model.set_attention(how)
            seconds, ids[label] = greedy(model, one, steps, graph=graph)
            out[f"B=1 {label} tok/s"] = steps / seconds
            out[f"B=1 {label} of roofline"] = steps / seconds / roof
        except Exception as err:  # a failed capture is a result too; the others still run
            out[f"B=1 {label} error"] = failed(err)
    for label in ids:
        if "fused" in ids and label != "fused":
            same = (ids[label] == ids["fused"]).float().mean().item()
            out[f"B=1 {label} same tokens as fused"] = same
    try:
        model.set_attention("fused")
        seconds, made = smoke_path(model, cfg["prompt"], steps)
        out["B=1 generate() tok/s"] = made / seconds
    except Exception as err:
        out["B=1 generate() error"] = failed(err)
    batches = []
    model.set_attention("fused")
    for b in cfg["batches"]:
        row: dict[str, Any] = {"batch": b}
        try:
            seconds, _ = greedy(model, prompts[b], steps, graph=True)
            row["ckpt-doctor fused + graph tok/s"] = b * steps / seconds
            row["of roofline"] = b * steps / seconds / (roof * b)
        except Exception as err:
            row["ckpt-doctor error"] = failed(err)
        batches.append(row)
    out["profile"] = profile(model, one, device)
    hf_rows = hf_side(model, cfg, prompts, steps, device)
    for row, hf in zip(batches, hf_rows, strict=True):
        row.update(hf)
        ours, theirs = row.get("ckpt-doctor fused + graph tok/s"), hf.get("HF+PEFT tok/s")
        if ours and theirs:
            row["ckpt-doctor / HF+PEFT"] = ours / theirs
    out["batches"] = batches
    return out


def hf_side(model: Any, cfg: dict, prompts: dict, steps: int, device: torch.device) -> list:
    """HF transformers + PEFT's adaption prompt on the model's own weights: tok/s per batch
    (sdpa attention, its DynamicCache, eager: how it is used), in the same run."""
    why = hf_peft.available()
    if why is not None:
        return [{"HF+PEFT": f"not measured: {why}"} for _ in prompts]
    hf_cfg = {"dim": cfg["dim"], "n_layers": cfg["n_layers"], "n_heads": cfg["h"],
              "vocab_size": cfg["vocab"], "ffn_hidden": cfg["ffn"], "norm_eps": 1e-5,
              "max_seq_len": model.args.max_seq_len, "adapter_len": cfg["la"],
              "adapter_layer": cfg["adapter_layer"]}  # fmt: skip
    try:
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        dtype = model.tok_embeddings.weight.dtype
        hf = hf_peft.build_hf(sd, hf_cfg, "sdpa", dtype=dtype, device=device)
        hf = hf_peft.wrap_peft(hf, sd["adapter_query.weight"], hf_cfg, gate=0.3)
    except Exception as err:
        return [{"HF+PEFT error": failed(err)} for _ in prompts]
    rows = []
    with torch.inference_mode():
        for b, prompt in prompts.items():
            try:
                hf_peft.decode_hf(hf, prompt, 2, sync=lambda: sync(device))  # warm
                times, _ = hf_peft.decode_hf(hf, prompt, steps, sync=lambda: sync(device))
                rows.append({"HF+PEFT tok/s": b * steps / sum(times)})
            except Exception as err:
                rows.append({"HF+PEFT error": failed(err)})
    rows[0]["HF+PEFT versions"] = hf_peft.versions()
    del hf
    return rows


def profile(model: Any, prompt: torch.Tensor, device: torch.device, steps: int = 8) -> list[dict]:
    """torch.profiler over ``steps`` replays of the graph-captured batch-1 step, with all the
    fused steps and with the fused attention alone: kernel time by kind, and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ckpt_doctor.generate import decode_step

    rows = []
    for label, setup in (("all fused", lambda: model.set_attention("fused")),
                         ("fused attention only", lambda: attention_only(model))):  # fmt: skip
        try:
            setup()
            with torch.inference_mode():
                cache = model.new_cache(1, model.args.max_seq_len)
                step = decode_step(model, cache, graph=device.type == "cuda")
                tok = model(prompt, 0, cache).argmax(-1)
                activities = [ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(ProfilerActivity.CUDA)
                with torch_profile(activities=activities) as prof:
                    for s in range(steps):
                        tok = step(tok, prompt.shape[1] + s).argmax(-1)
                    sync(device)
            rows.append({"setup": label, **kernel_shares(prof, device, steps)})
        except Exception as err:
            rows.append({"setup": label, "error": failed(err)})
    return rows


def kernel_shares(prof: Any, device: torch.device, steps: int) -> dict[str, Any]:
    """Per step: device time in GEMM/GEMV kernels, in ckpt-doctor's kernels, in the rest; the
    kernel count; the three largest non-GEMM kernels."""
    events = [e for e in prof.key_averages() if (_device_us(e, device) > 0)]
    total = sum(_device_us(e, device) for e in events)
    gemm = sum(_device_us(e, device) for e in events if _is(e.key, MATMUL_WORDS))
    ours = sum(_device_us(e, device) for e in events if _is(e.key, OUR_KERNELS))
    rest = sorted((e for e in events if not _is(e.key, MATMUL_WORDS + OUR_KERNELS)),
                  key=lambda e: -_device_us(e, device))[:3]  # fmt: skip
    return {
        "us per step": total / steps,
        "GEMM/GEMV share": gemm / total if total else None,
        "ckpt-doctor kernels share": ours / total if total else None,
        "other share": (total - gemm - ours) / total if total else None,
        "kernels per step": sum(e.count for e in events) / steps,
        "largest other": "; ".join(f"{e.key[:40]} {_device_us(e, device) / steps:.0f} us"
                                   for e in rest),
    }  # fmt: skip


def _device_us(e: Any, device: torch.device) -> float:
    if device.type != "cuda":
        return e.self_cpu_time_total
    return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))


def _is(name: str, words: tuple[str, ...]) -> bool:
    return any(w in name.lower() for w in words)
