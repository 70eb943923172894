"""The synthetic ~2 GiB LLaMA / LLaMA-Adapter checkpoint pair the CPU benchmarks share
(README.md, Setup): a flat fp16 Meta-named base and an upstream-style training checkpoint of it
with an adapter, optimizer state and args, two base tensors perturbed."""

from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

from common import GIB, write_json

# --------------------------------------------------------------------------------------------

VOCAB = 32000
N_HEADS = 16
MULTIPLE_OF = 256
ADAPTER_LEN = 10
MAX_SEQ_LEN = 512
MIN_LAYERS = 8  # layers.7 is perturbed, so at least 8 layers must exist
PERTURBED = ("layers.3.attention.wq.weight", "layers.7.feed_forward.w2.weight")
# Bump when the generated content changes so stale caches are rebuilt.
GENERATOR_VERSION = 1


def ffn_hidden(dim: int) -> int:
    """LLaMA's FeedForward hidden size: 2/3 of 4*dim, rounded up to a multiple of 256."""
    h = int(2 * 4 * dim / 3)
    return MULTIPLE_OF * math.ceil(h / MULTIPLE_OF)


def llama_shapes(dim: int, n_layers: int) -> dict[str, tuple[int, ...]]:
    h = ffn_hidden(dim)
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (VOCAB, dim)}
    for i in range(n_layers):
        for w in ("wq", "wk", "wv", "wo"):
            shapes[f"layers.{i}.attention.{w}.weight"] = (dim, dim)
        shapes[f"layers.{i}.feed_forward.w1.weight"] = (h, dim)
        shapes[f"layers.{i}.feed_forward.w2.weight"] = (dim, h)
        shapes[f"layers.{i}.feed_forward.w3.weight"] = (h, dim)
        shapes[f"layers.{i}.attention_norm.weight"] = (dim,)
        shapes[f"layers.{i}.ffn_norm.weight"] = (dim,)
    shapes["norm.weight"] = (dim,)
    shapes["output.weight"] = (VOCAB, dim)
    return shapes


def choose_config(target_gib: float) -> dict[str, int]:
    """Pick (dim, n_layers) so the fp16 base is ~target_gib.

    dim is 2048 as specified; for targets too small to hold the embeddings plus MIN_LAYERS layers
    at dim 2048 (quick self-tests), dim is halved until it fits, keeping n_heads = 16.
    """
    target = target_gib * GIB
    dim = 2048
    while True:
        h = ffn_hidden(dim)
        fixed = 2 * (2 * VOCAB * dim + dim)  # embeddings + output + final norm, fp16
        per_layer = 2 * (4 * dim * dim + 3 * h * dim + 2 * dim)
        n_layers = round((target - fixed) / per_layer)
        if n_layers >= MIN_LAYERS or dim <= 128:
            return {"dim": dim, "n_layers": max(n_layers, MIN_LAYERS), "n_heads": N_HEADS}
        dim //= 2


def _fill(shape: tuple[int, ...], seed: int, *, scale: float, block_rows: int = 512) -> Any:
    """A cheap pseudo-random fp16 tensor: randn one small block, then tile it with column rolls.

    torch.randn over ~1e9 fp32 elements would dominate build time and need 4 bytes/element of
    scratch; this touches each output byte once. Each tensor has its own seed and each tile its own
    roll, so tensors differ from one another and rows within a tensor are not plain repeats.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return (torch.randn(shape, generator=g) * scale).to(torch.float16)
    rows, cols = shape
    blk = (torch.randn((min(rows, block_rows), cols), generator=g) * scale).to(torch.float16)
    out = torch.empty(shape, dtype=torch.float16)
    for k, start in enumerate(range(0, rows, blk.shape[0])):
        stop = min(start + blk.shape[0], rows)
        out[start:stop] = torch.roll(blk[: stop - start], shifts=(k * 997) % cols, dims=1)
    return out


def _tensor_seed(seed: int, name: str) -> int:
    # Stable across runs (unlike hash()), distinct per tensor name.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _expected_manifest(target_gib: float, seed: int) -> dict[str, Any]:
    cfg = choose_config(target_gib)
    adapter_layer = cfg["n_layers"] - 2
    shapes = llama_shapes(cfg["dim"], cfg["n_layers"])
    adapter_shapes: dict[str, tuple[int, ...]] = {
        "adapter_query.weight": (adapter_layer * ADAPTER_LEN, cfg["dim"])
    }
    for i in range(cfg["n_layers"]):
        adapter_shapes[f"layers.{i}.attention.gate"] = (1, cfg["n_heads"], 1, 1)
    return {
        "generator_version": GENERATOR_VERSION,
        "target_gib": target_gib,
        "seed": seed,
        "config": {
            **cfg,
            "vocab": VOCAB,
            "ffn_hidden": ffn_hidden(cfg["dim"]),
            "adapter_len": ADAPTER_LEN,
            "adapter_layer": adapter_layer,
            "max_seq_len": MAX_SEQ_LEN,
        },
        "perturbed": list(PERTURBED),
        "base_shapes": {k: list(v) for k, v in shapes.items()},
        "adapter_shapes": {k: list(v) for k, v in adapter_shapes.items()},
    }


def build_llama_checkpoints(workdir: Path, *, target_gib: float, seed: int) -> dict[str, Any]:
    """Write ``base.pth`` (flat fp16 Meta-named state dict) and ``finetuned.pth`` (training ckpt).

    Reuses existing files when ``manifest.json`` matches the requested shapes/seed. The manifest is
    written last, so an interrupted build is never mistaken for a complete one.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    manifest_path = workdir / "manifest.json"
    base_path, ft_path = workdir / "base.pth", workdir / "finetuned.pth"
    want = _expected_manifest(target_gib, seed)

    def sizes() -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (base_path, ft_path)}

    def result() -> dict[str, Any]:
        return {
            "base": str(base_path),
            "finetuned": str(ft_path),
            "perturbed": list(PERTURBED),
            "config": want["config"],
            "base_bytes": base_path.stat().st_size,
            "finetuned_bytes": ft_path.stat().st_size,
        }

    try:
        have = json.loads(manifest_path.read_text())
        if have.pop("files") == sizes() and have == want:
            return result()
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # missing or stale cache: rebuild
    manifest_path.unlink(missing_ok=True)
    import torch  # only now: importing torch costs ~2 s, and cache hits do not need it

    cfg = want["config"]
    dim, n_layers, n_heads = cfg["dim"], cfg["n_layers"], cfg["n_heads"]
    adapter_layer = cfg["adapter_layer"]

    # Base weights: ~N(0, 0.02) like an initialised/trained LLaMA; norms near 1.
    base: dict[str, torch.Tensor] = {}
    for name, shape in want["base_shapes"].items():
        s = _tensor_seed(seed, name)
        if len(shape) == 1:
            base[name] = (1.0 + _fill(tuple(shape), s, scale=0.05).float()).to(torch.float16)
        else:
            base[name] = _fill(tuple(shape), s, scale=0.02)
    _atomic_save(base, base_path)

    # Fine-tuned model: base tensors shared (no copy) except the perturbed ones.
    model: dict[str, torch.Tensor] = dict(base)
    g = torch.Generator().manual_seed(seed + 1)
    for name in PERTURBED:
        t = base[name].clone()
        rows = torch.randperm(t.shape[0], generator=g)[:4]
        # 1e-3 is ~60x the fp16 spacing near 0.02, so the delta survives the fp16 cast.
        delta = torch.randn((len(rows), t.shape[1]), generator=g) * 1e-3 + 1e-3
        t[rows] = (t[rows].float() + delta).to(torch.float16)
        assert not torch.equal(t, base[name])
        model[name] = t

    adapter: dict[str, torch.Tensor] = {
        "adapter_query.weight": torch.randn((adapter_layer * ADAPTER_LEN, dim), generator=g) * 0.02,
    }
    first_adapted = n_layers - adapter_layer
    for i in range(n_layers):
        gate = torch.zeros((1, n_heads, 1, 1))
        if i >= first_adapted:  # gates start at 0 and only train in the adapted top layers
            gate = torch.randn((1, n_heads, 1, 1), generator=g) * 0.1
        adapter[f"layers.{i}.attention.gate"] = gate
    model.update(adapter)

    # AdamW-like optimizer state for the trainable (adapter) parameters only.
    opt_state = {
        idx: {
            "step": torch.tensor(4000.0),
            "exp_avg": torch.randn(t.shape, generator=g) * 1e-4,
            "exp_avg_sq": torch.rand(t.shape, generator=g) * 1e-8,
        }
        for idx, t in enumerate(adapter.values())
    }
    optimizer = {
        "state": opt_state,
        "param_groups": [
            {
                "lr": 9e-3,
                "betas": (0.9, 0.95),
                "eps": 1e-8,
                "weight_decay": 0.02,
                "amsgrad": False,
                "foreach": None,
                "maximize": False,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "params": list(range(len(adapter))),
            }
        ],
    }
    ckpt = {
        "model": model,
        "optimizer": optimizer,
        "epoch": 4,
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "args": argparse.Namespace(
            adapter_len=ADAPTER_LEN, adapter_layer=adapter_layer, max_seq_len=MAX_SEQ_LEN
        ),
    }
    _atomic_save(ckpt, ft_path)
    del base, model, ckpt
    write_json(manifest_path, {**want, "files": sizes()})
    return result()


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)  # zip format (the default since torch 1.6)
    os.replace(tmp, path)
