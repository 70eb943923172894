"""The baseline every decode benchmark compares against: HF transformers' LlamaForCausalLM with
PEFT's adaption prompt, on the same weights as ckpt-doctor's model (benchmark environment
only: ``pip install transformers peft accelerate``; not project dependencies).

What PEFT's adaption prompt computes (read from peft/tuners/adaption_prompt/{layer,utils,model}.py,
peft 0.21.2), against the reference math (docs/model.md):

- Adapted layers: ``parents[-adapter_layers:]``, the top layers in order, so PEFT's j-th adapted
  layer is layer ``n_layers - adapter_layers + j``, the same rows of adapter_query as upstream.
- Prompt keys/values: ``k_proj(adaption_prompt)``, ``v_proj(adaption_prompt)`` with the frozen
  projections and NO RoPE on them (as ours). Queries are recomputed (``q_proj`` again, then RoPE
  from the layer's ``position_embeddings``): the same RoPE'd Q as the base attention.
- Scores ``Q Ka^T / sqrt(head_dim)`` (as ours), softmax in fp32 over the prompt only, a softmax
  independent of the causal one (as ours), cast back to the query dtype.
- Gate: ``adaption_gate`` multiplies the probabilities raw (no tanh), a scalar per layer (shape
  [1]), so it matches ckpt-doctor's ``gate_fn="raw"`` only when all heads share one gate value.
- Output: ``o_proj(base) + o_proj(adapter)`` instead of ``o_proj(base + adapter)``: equal up to
  rounding.
- Cost: in every adapted layer and every decode step PEFT runs q_proj and v_proj of the hidden
  states a second time (``llama_compute_query_states``; the v_proj result is unused with
  transformers >= 4.48), k_proj and v_proj of the prompt, and a second o_proj; ckpt-doctor
  computes the prompt K/V once per load and applies wo once. transformers' DynamicCache also
  grows by torch.cat every step, where ckpt-doctor writes into a preallocated cache.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch


def available() -> str | None:
    """None when transformers and peft import; else why not (the GPU machine may lack them)."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers / peft not installed ({exc.name})"
    return None


def versions() -> str:
    import peft
    import transformers

    return f"transformers {transformers.__version__}, peft {peft.__version__}"


def meta_to_hf(sd: dict[str, torch.Tensor], n_layers: int, n_heads: int) -> dict[str, torch.Tensor]:
    """Meta state dict -> LlamaForCausalLM's. Meta rotates pairs (2i, 2i+1), HF rotates halves
    (i, i + hd/2): within each head, row 2i moves to i and row 2i+1 to i + hd/2 for wq, wk."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        out_dim, in_dim = w.shape
        hd = out_dim // n_heads
        return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)

    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = permute(sd[m + "attention.wq.weight"])
        out[h + "self_attn.k_proj.weight"] = permute(sd[m + "attention.wk.weight"])
        out[h + "self_attn.v_proj.weight"] = sd[m + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[m + "attention.wo.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[m + "feed_forward.w1.weight"]
        out[h + "mlp.down_proj.weight"] = sd[m + "feed_forward.w2.weight"]
        out[h + "mlp.up_proj.weight"] = sd[m + "feed_forward.w3.weight"]
        out[h + "input_layernorm.weight"] = sd[m + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "ffn_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def build_hf(
    sd: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    attn: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """LlamaForCausalLM holding the Meta state dict ``sd`` (cfg: dim, n_layers, n_heads,
    vocab_size, ffn_hidden, norm_eps, max_seq_len), built in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["dim"],
        intermediate_size=cfg["ffn_hidden"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_heads"],
        max_position_embeddings=cfg["max_seq_len"],
        rms_norm_eps=cfg["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = attn
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 detour for a 16-bit 7B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = model.load_state_dict(
        meta_to_hf(sd, cfg["n_layers"], cfg["n_heads"]), strict=False
    )
    # Only the rotary inv_freq buffers may be absent from a state dict.
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval()


def wrap_peft(model: Any, query: torch.Tensor, cfg: dict[str, Any], *, gate: float) -> Any:
    """PEFT's adaption prompt on ``model``: prompts = rows of ``query`` [L*len, dim], every
    adapted layer's gate ``gate``."""
    from peft import AdaptionPromptConfig, get_peft_model

    a_len, a_layer, n_layers = cfg["adapter_len"], cfg["adapter_layer"], cfg["n_layers"]
    peft = get_peft_model(
        model,
        AdaptionPromptConfig(adapter_len=a_len, adapter_layers=a_layer, task_type="CAUSAL_LM"),
    )
    prompts = query.reshape(a_layer, a_len, cfg["dim"])
    for j, i in enumerate(range(n_layers - a_layer, n_layers)):
        attn = model.model.layers[i].self_attn
        assert type(attn).__name__ == "AdaptedAttention", f"layer {i} is not adapted"
        with torch.no_grad():
            attn.adaption_prompt.copy_(prompts[j][None])
            attn.adaption_gate.fill_(gate)
    for i in range(n_layers - a_layer):
        assert type(model.model.layers[i].self_attn).__name__ != "AdaptedAttention"
    return peft.eval()


def set_peft_gate(model: Any, gate: float) -> None:
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "adaption_gate"):
            with torch.no_grad():
                layer.self_attn.adaption_gate.fill_(gate)


def set_attn(model: Any, attn: str) -> None:
    model.config._attn_implementation = attn
    for layer in model.model.layers:  # PEFT wraps the attention; the config object is shared
        inner = getattr(layer.self_attn, "model", layer.self_attn)
        inner.config._attn_implementation = attn


def cache_kwarg(model: Any) -> str:
    """transformers 5.x renamed past_key_values to cache (the old name is deprecated)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


Decoded = tuple[list[float], torch.Tensor]  # seconds of each decode step, the greedy tokens


def decode_hf(model: Any, prompt: torch.Tensor, steps: int, *, sync: Any = None) -> Decoded:
    """Prefill, then ``steps`` greedy one-token steps with its DynamicCache (only the steps
    are timed; ``sync`` waits for the device before each clock read)."""
    from transformers import DynamicCache

    sync = sync or (lambda: None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = DynamicCache(config=base.config)
    kw = {cache_kwarg(base): cache, "use_cache": True}
    tok = model(input_ids=prompt, logits_to_keep=1, **kw).logits[:, -1].argmax(-1)
    out, times = [tok], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        tok = model(input_ids=tok[:, None], **kw).logits[:, -1].argmax(-1)
        sync()
        times.append(time.perf_counter() - t0)
        out.append(tok)
    return times, torch.stack(out, 1)
