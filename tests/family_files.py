"""Tiny files of every adapter family, as each family's own code writes them, for the tests.

Shapes and names follow the upstream code (LLaMA-Adapter v2 chat / multimodal, PEFT's
adaption prompt, litgpt adapter_v2); values are seeded random. The model is fixtures'
TinyConfig (dim 64, 4 layers, 4 heads, vocab 128), or the fixture world's base (same dims,
vocab 256) where a test generates text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fixtures.make_fixtures import TinyConfig

WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"
WORLD_CFG = TinyConfig(vocab_size=256)


def _rand(g: torch.Generator, *shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def v2_chat(cfg: TinyConfig, *, prompt: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """LLaMA-Adapter v2 chat's trained tensors: a bias and an input scale on every linear,
    the layer norms, and optionally a prompt with tanh gates on the last 2 layers."""
    g = torch.Generator().manual_seed(seed)
    d, h = cfg.dim, cfg.ffn_hidden
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        for w in "qkvo":
            out[f"{a}.w{w}_bias"] = _rand(g, d)
            out[f"{a}.w{w}_scale"] = 1 + _rand(g, d)
        out[f"{f}.w1_bias"], out[f"{f}.w3_bias"] = _rand(g, h), _rand(g, h)
        out[f"{f}.w2_bias"] = _rand(g, d)
        out[f"{f}.w1_scale"], out[f"{f}.w3_scale"] = 1 + _rand(g, d), 1 + _rand(g, d)
        out[f"{f}.w2_scale"] = 1 + _rand(g, h)
        out[f"layers.{i}.attention_norm.weight"] = 1 + _rand(g, d)
        out[f"layers.{i}.ffn_norm.weight"] = 1 + _rand(g, d)
    if prompt:
        out["adapter_query.weight"] = _rand(g, 5 * 2, d, scale=0.5)
        for i in range(cfg.n_layers - 2, cfg.n_layers):
            out[f"layers.{i}.attention.gate"] = 0.3 + torch.rand(1, cfg.n_heads, 1, 1, generator=g)
    return out


def v2_chat_checkpoint(trained: dict[str, torch.Tensor]) -> dict:
    """Its training script's checkpoint-N.pth: the trainable tensors under 'model'."""
    return {
        "model": trained,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": []}]},
        "epoch": 1,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(adapter_len=5, adapter_layer=2, max_seq_len=64),
    }


def v2_multimodal(cfg: TinyConfig, *, lora: bool, seed: int = 2) -> dict[str, torch.Tensor]:
    """What LLaMA-Adapter v2 multimodal's extract keeps (BIAS, or LORA-BIAS with lora):
    2 visual blocks (width 32), CLIP width 24, query_len 4 on the last 3 layers."""
    g = torch.Generator().manual_seed(seed)
    d, h, v, c, q_len, q_layer = cfg.dim, cfg.ffn_hidden, 32, 24, 4, 3
    out: dict[str, torch.Tensor] = {}
    block = {"norm1": (v,), "attn.qkv": (3 * v, v), "attn.proj": (v, v), "norm2": (v,),
             "mlp.fc1": (4 * v, v), "mlp.fc2": (v, 4 * v)}  # fmt: skip
    for i in range(2):
        for k, shape in block.items():
            out[f"visual_blocks.{i}.{k}.weight"] = _rand(g, *shape)
            out[f"visual_blocks.{i}.{k}.bias"] = _rand(g, shape[0])
    sizes = {"attention.wq.bias": d, "attention.wo.bias": d, "feed_forward.w1.bias": h,
             "feed_forward.w2.bias": d, "feed_forward.w3.bias": h}  # fmt: skip
    for i in range(cfg.n_layers):
        p = f"llama.layers.{i}."
        out[p + "attention.gate"] = _rand(g, 1, cfg.n_heads, 1, 1, scale=1.0)
        for k, size in sizes.items():
            out[p + k] = _rand(g, size)
        out[p + "attention_norm.weight"] = 1 + _rand(g, d)
        out[p + "ffn_norm.weight"] = 1 + _rand(g, d)
        if lora:
            for w, (i_dim, o_dim) in {
                "wq": (d, d),
                "wk": (d, d),
                "wv": (d, d),
                "wo": (d, d),
            }.items():
                out[p + f"attention.lora_{w}_l1.weight"] = _rand(g, 4, i_dim)
                out[p + f"attention.lora_{w}_l2.weight"] = _rand(g, o_dim, 4)
            for w, (i_dim, o_dim) in {"w1": (d, h), "w2": (h, d), "w3": (d, h)}.items():
                out[p + f"feed_forward.lora_{w}_l1.weight"] = _rand(g, 4, i_dim)
                out[p + f"feed_forward.lora_{w}_l2.weight"] = _rand(g, o_dim, 4)
            out[p + "attention.new_gate"] = torch.ones(1, 1, 1, 1)
    for k, shape in {"clip_proj_norm": (v,), "visual_proj_norm": (d,), "visual_proj": (d, v),
                     "clip_proj": (v, c)}.items():  # fmt: skip
        out[f"{k}.weight"] = _rand(g, *shape)
        out[f"{k}.bias"] = _rand(g, shape[0])
    out["llama.norm.weight"] = 1 + _rand(g, d)
    out["visual_query.weight"] = _rand(g, q_len, v)
    out["adapter_query.weight"] = _rand(g, q_len * q_layer, d)
    return out


def v2_multimodal_release(trained: dict[str, torch.Tensor], *, lora: bool) -> dict:
    return {"model": trained, "config": {"w_bias": True, "w_lora": lora, "lora_rank": 4}}


def v2_multimodal_training(base: dict[str, torch.Tensor], trained: dict) -> dict:
    """Its training checkpoint: the whole model state (frozen CLIP and LLaMA included)."""
    model = {f"llama.{k}": v for k, v in base.items()}
    model.update(trained)
    g = torch.Generator().manual_seed(3)
    model["clip.visual.proj"] = _rand(g, 24, 24)
    model["clip.logit_scale"] = torch.tensor(4.6)
    model["clip.positional_embedding"] = _rand(g, 7, 24)
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": []}]},
        "epoch": 0,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(llama_type="7B"),
    }


def peft_adapter_dir(
    directory: Path, cfg: TinyConfig, *, gates: tuple[float, ...] = (0.7, -0.4), length: int = 5
) -> Path:
    """What PEFT's save_pretrained writes for an ADAPTION_PROMPT adapter on the last layers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {}
    for i, gate in zip(range(cfg.n_layers - len(gates), cfg.n_layers), gates, strict=True):
        stem = f"base_model.model.model.layers.{i}.self_attn"
        sd[f"{stem}.adaption_prompt"] = torch.randn(1, length, cfg.dim, generator=g)
        sd[f"{stem}.adaption_gate"] = torch.tensor([gate])
    save_file(sd, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "ADAPTION_PROMPT",
        "task_type": "CAUSAL_LM",
        "adapter_len": length,
        "adapter_layers": len(gates),
        "target_modules": "self_attn",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def peft_full_state(hf: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A PeftModel's full state dict (a Trainer checkpoint): the HF base under
    base_model.model., each adapted attention module wrapped as self_attn.model."""
    from safetensors.torch import load_file

    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    adapted = {k.split(".self_attn.")[0] + ".self_attn." for k in adapter}
    out = {}
    for name, value in hf.items():
        full = "base_model.model." + name
        stem = next((s for s in adapted if full.startswith(s)), None)
        out[full if stem is None else stem + "model." + full[len(stem) :]] = value
    out.update(adapter)
    return out


def litgpt_v2(cfg: TinyConfig, *, seed: int = 5) -> tuple[dict, dict]:
    """(base, adapter file) of litgpt adapter_v2 on a LLaMA-shaped GPT from layer 1 up: the
    adapter file holds adapter_wte, gating_factor, every linear's adapter_bias/adapter_scale and
    the norms; the full model names its frozen linears <linear>.linear.weight."""
    g = torch.Generator().manual_seed(seed)
    d, h = cfg.dim, cfg.ffn_hidden
    base = {
        "transformer.wte.weight": _rand(g, cfg.vocab_size, d),
        "lm_head.weight": _rand(g, cfg.vocab_size, d),
    }
    linears = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc_1": (h, d),
               "mlp.fc_2": (h, d), "mlp.proj": (d, h)}  # fmt: skip
    adapter: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        for k, shape in linears.items():
            base[p + k + ".weight"] = _rand(g, *shape)
            adapter[p + k + ".adapter_bias"] = _rand(g, shape[0])
            adapter[p + k + ".adapter_scale"] = 1 + _rand(g, shape[0])
        for n in ("norm_1", "norm_2"):
            base[p + n + ".weight"] = torch.ones(d)
            adapter[p + n + ".weight"] = 1 + _rand(g, d)
        if i >= 1:
            adapter[p + "attn.adapter_wte.weight"] = _rand(g, 6, d)
            adapter[p + "attn.gating_factor"] = _rand(g, 1, 1, cfg.n_heads, 1)
    base["transformer.ln_f.weight"] = torch.ones(d)
    adapter["transformer.ln_f.weight"] = 1 + _rand(g, d)
    adapter["lm_head.adapter_bias"] = _rand(g, cfg.vocab_size)
    adapter["lm_head.adapter_scale"] = 1 + _rand(g, cfg.vocab_size)
    return base, adapter


def litgpt_v2_full(base: dict, adapter: dict) -> dict:
    """The adapter_v2 GPT's own state dict: frozen linears as <linear>.linear.weight."""
    full = {}
    for name, value in base.items():
        stem, _, kind = name.rpartition(".")
        linear = (
            name.startswith(("transformer.h.", "lm_head"))
            and kind == "weight"
            and (".attn." in name or ".mlp." in name or name.startswith("lm_head"))
        )
        full[f"{stem}.linear.{kind}" if linear else name] = value
    full.update(adapter)
    return full
