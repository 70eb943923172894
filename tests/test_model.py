"""ckpt_doctor.model against the independent plain forward in tests/reference_llama.py.

The fixture's weights are tiny (std 0.02, prompt std 0.02, gates <= 0.3): attention is nearly
uniform and the adapter barely moves the logits, so a wrong scale or a rotated prompt would hide
under any tolerance. These tests sharpen them: wq/wk x8 (peaked attention), output x5 (logits of
order 1), adapter_query x50 (std 1, as upstream's nn.Embedding init) and gates of magnitude
0.3..1.5. The correct reference then matches the model to ~1e-6 while each wrong variant is off
by ~1 (far over 100x the tolerance).

Tolerances (max abs diff on logits of order 1-3):
- fp32 model vs the reference: 1e-5 (observed 1.2e-6..1.8e-6, fp32 or fp64 reference alike).
- fp16 model vs the float64 reference on the same (rounded) weights: 1.3e-2 (observed 3.7e-3 to
  4.3e-3).
- bf16 model vs the float64 reference on the same (rounded) weights: 1.2e-1 (observed 3.2e-2 to
  4.0e-2).
  Prefill and cached decode show the same errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckpt_doctor.loading import load_model
from ckpt_doctor.model import ModelArgs, Transformer
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    extracted_adapter,
    save_zip,
    training_checkpoint,
    write_meta_dir,
)
from tests.reference_llama import reference_logits, rotate

CFG = TinyConfig()
TOL_FP32 = 1e-5
TOL = {torch.float16: 1.3e-2, torch.bfloat16: 1.2e-1}
SEQ = 12
PREFILL = 5
ADAPTED = list(CFG.adapted_layers)


pytestmark = pytest.mark.usefixtures("one_thread")


def sharp_weights(*, scalar_gates: bool = False) -> tuple[dict, dict]:
    """Fixture tensors (fp32) rescaled so the attention and the adapter matter (see above)."""
    base = base_state_dict(CFG, dtype=torch.float32)
    for name in list(base):
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            base[name] = base[name] * 8
    base["output.weight"] = base["output.weight"] * 5
    adapter = adapter_tensors(CFG, gate_scale=1.5, scalar_gates=scalar_gates)
    adapter["adapter_query.weight"] = adapter["adapter_query.weight"] * 50
    return base, adapter


def tokens(batch: int = 3, length: int = SEQ, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=g)


def ref_kwargs(gate_fn: str = "raw", *, adapter: bool = True) -> dict:
    return {
        "n_heads": CFG.n_heads,
        "norm_eps": CFG.norm_eps,
        "adapter_len": CFG.adapter_len if adapter else 0,
        "adapter_layer": CFG.adapter_layer if adapter else 0,
        "gate_fn": gate_fn,
    }


def build(
    sd: dict, *, dtype: torch.dtype = torch.float32, gate_fn: str = "raw", adapter: bool = True
) -> Transformer:
    """A model straight from a state dict (meta device + assign), no loader involved."""
    args = ModelArgs(
        dim=CFG.dim,
        n_layers=CFG.n_layers,
        n_heads=CFG.n_heads,
        vocab_size=CFG.vocab_size,
        ffn_hidden=CFG.ffn_hidden,
        norm_eps=CFG.norm_eps,
        max_seq_len=64,
        adapter_len=CFG.adapter_len if adapter else 0,
        adapter_layer=CFG.adapter_layer if adapter else 0,
    )
    with torch.device("meta"):
        model = Transformer(args)
    state = {k: v.to(dtype) for k, v in sd.items()}
    if not adapter:  # an adapter-less model still has (empty) adapter_query and zero gates
        state["adapter_query.weight"] = torch.zeros(0, CFG.dim, dtype=dtype)
        for i in range(CFG.n_layers):
            state[f"layers.{i}.attention.gate"] = torch.zeros(1, CFG.n_heads, 1, 1, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    model.prepare(gate_fn=gate_fn)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A fp32 Meta base dir plus per-head and legacy-scalar adapter files, sharp weights."""
    root = tmp_path_factory.mktemp("model")
    base, adapter = sharp_weights()
    _, scalar = sharp_weights(scalar_gates=True)
    write_meta_dir(base, root / "base", CFG)
    return {
        "base": base,
        "adapter": adapter,
        "scalar": scalar,
        "base_dir": root / "base",
        "adapter_pth": save_zip(extracted_adapter(CFG, adapter), root / "adapter.pth"),
        "scalar_pth": save_zip(extracted_adapter(CFG, scalar), root / "scalar.pth"),
    }


def loaded(files: dict, which: str, **kw) -> Transformer:
    adapter = open_checkpoint(files[f"{which}_pth"])
    model, _ = load_model(open_checkpoint(files["base_dir"]), adapter=adapter, max_seq_len=64, **kw)
    return model


def prefill(model: Transformer, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks, 0, model.new_cache(toks.shape[0]), all_logits=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- parity, fp32


@pytest.mark.parametrize("gates", ["adapter", "scalar"])
@pytest.mark.parametrize("gate_fn", ["raw", "tanh"])
def test_prefill_matches_reference_fp32(files, gate_fn, gates):
    model = loaded(files, gates, gate_fn=gate_fn)
    assert model.tok_embeddings.weight.dtype == torch.float32
    toks = tokens()
    got = prefill(model, toks)
    sd = {**files["base"], **files[gates]}  # scalar gates: the reference broadcasts them itself
    want = reference_logits(sd, toks, **ref_kwargs(gate_fn))
    assert got.shape == (3, SEQ, CFG.vocab_size) and got.dtype == torch.float32
    assert max_diff(got, want) <= TOL_FP32
    # The adapter matters here: the same model without it is far off.
    base_only = reference_logits(files["base"], toks, **ref_kwargs(adapter=False))
    assert max_diff(got, base_only) > 100 * TOL_FP32


@pytest.mark.parametrize("gates", ["adapter", "scalar"])
@pytest.mark.parametrize("gate_fn", ["raw", "tanh"])
def test_cached_decode_matches_reference_fp32(files, gate_fn, gates):
    model = loaded(files, gates, gate_fn=gate_fn)
    toks = tokens()
    want = reference_logits({**files["base"], **files[gates]}, toks, **ref_kwargs(gate_fn))
    cache = model.new_cache(3)
    with torch.no_grad():
        first = model(toks[:, :PREFILL], 0, cache, all_logits=True)
        assert max_diff(first, want[:, :PREFILL]) <= TOL_FP32
        last = model(toks[:, :PREFILL], 0, model.new_cache(3))  # default: last position only
        assert last.shape == (3, CFG.vocab_size)
        assert max_diff(last, want[:, PREFILL - 1]) <= TOL_FP32
        for pos in range(PREFILL, SEQ):
            step = model(toks[:, pos : pos + 1], pos, cache)
            assert step.shape == (3, CFG.vocab_size) and step.dtype == torch.float32
            assert max_diff(step, want[:, pos]) <= TOL_FP32, pos


def test_scalar_gate_broadcasts_to_every_head(files):
    model = loaded(files, "scalar")
    for i in ADAPTED:
        gate = model.layers[i].attention.gate
        scalar = files["scalar"][f"layers.{i}.attention.gate"]
        assert gate.shape == (1, CFG.n_heads, 1, 1)
        assert torch.equal(gate.detach(), scalar.reshape(1, 1, 1, 1).expand_as(gate))


# ------------------------------------------------------------------ reduced precision vs fp64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_vs_float64_reference(files, dtype):
    toks = tokens()
    sd = {**files["base"], **files["adapter"]}
    low = build(sd, dtype=dtype)
    full = build(sd)
    assert low.layers[0].attention.wq.weight.dtype == dtype
    # The float64 reference runs on exactly the weights each model holds (after rounding),
    # so the errors below come from the arithmetic alone.
    want_low = reference_logits(
        {k: v.double() for k, v in low.state_dict().items()}, toks, **ref_kwargs()
    )
    want_full = reference_logits(sd, toks, **ref_kwargs(), dtype=torch.float64)
    got_low = prefill(low, toks)
    assert got_low.dtype == torch.float32  # logits come back in fp32 whatever the model dtype
    err_low = max_diff(got_low, want_low)
    err_fp32 = max_diff(prefill(full, toks), want_full)
    assert err_low <= TOL[dtype]
    assert err_fp32 <= TOL_FP32
    assert err_fp32 * 100 < err_low  # fp32 is orders of magnitude closer to fp64
    # The cached decode path in reduced precision stays within the same tolerance.
    cache = low.new_cache(3)
    with torch.no_grad():
        low(toks[:, :PREFILL], 0, cache)
        for pos in range(PREFILL, SEQ):
            assert max_diff(low(toks[:, pos : pos + 1], pos, cache), want_low[:, pos]) <= TOL[dtype]


# -------------------------------------------------------------------- zero gates == base model


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_all_zero_gates_give_exactly_the_base_model(files, dtype):
    base, adapter = files["base"], files["adapter"]
    zeroed = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in adapter.items()}
    toks = tokens()
    with_inert = build({**base, **zeroed}, dtype=dtype)
    without = build(base, dtype=dtype, adapter=False)
    assert with_inert.adapter_kv and not without.adapter_kv
    assert torch.equal(prefill(with_inert, toks), prefill(without, toks))
    # The decode path too (no mask, cached keys).
    c1, c2 = with_inert.new_cache(3), without.new_cache(3)
    with torch.no_grad():
        for pos in range(SEQ):
            a = with_inert(toks[:, pos : pos + 1], pos, c1)
            b = without(toks[:, pos : pos + 1], pos, c2)
            assert torch.equal(a, b), pos
    # Sanity: the same prompt with its real gates does change the logits.
    live = build({**base, **adapter}, dtype=dtype)
    assert not torch.equal(prefill(live, toks), prefill(without, toks))


def test_all_zero_gates_through_load_model_equal_base(files, tmp_path):
    """Same through the loader: a full checkpoint (args known) whose gates are all zero."""
    base, adapter = files["base"], files["adapter"]
    zeroed = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in adapter.items()}
    full = save_zip(training_checkpoint(CFG, base, zeroed), tmp_path / "checkpoint-0.pth")
    base_ckpt = open_checkpoint(files["base_dir"])
    inert, report = load_model(base_ckpt, full=open_checkpoint(full), max_seq_len=64)
    plain, plain_report = load_model(base_ckpt, max_seq_len=64)
    assert report.args.adapter_layer == CFG.adapter_layer and plain_report.args.adapter_layer == 0
    toks = tokens()
    assert torch.equal(prefill(inert, toks), prefill(plain, toks))


# ------------------------------------------------------------------------ raw vs tanh gating


def attention_heads(model: Transformer, layer: int, x: torch.Tensor, adapter) -> torch.Tensor:
    """O (the input of Wo) of one Attention call, split per head: [B, T, H, hd]."""
    attn = model.layers[layer].attention
    seen = []
    handle = attn.wo.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    b, t, _ = x.shape
    cache = model.new_cache(b)
    try:
        with torch.no_grad():
            attn(
                x,
                start=0,
                rope=model.rope[:t],
                cache_k=cache.k[layer],
                cache_v=cache.v[layer],
                adapter=adapter,
            )
    finally:
        handle.remove()
    (o,) = seen
    return o.view(b, t, CFG.n_heads, -1)


def test_raw_and_tanh_differ_exactly_as_g_vs_tanh_g(files):
    """Per head, the adapter term under raw gating is g / tanh(g) times the tanh one."""
    model = build({**files["base"], **files["adapter"]})
    raw = model.compute_adapter_kv(gate_fn="raw")
    tanh = model.compute_adapter_kv(gate_fn="tanh")
    x = torch.randn(2, 9, CFG.dim, generator=torch.Generator().manual_seed(3))
    for i in ADAPTED:
        g = files["adapter"][f"layers.{i}.attention.gate"].flatten().double()
        assert (g.abs() >= 0.3).all() and (g.abs() <= 1.5).all()
        assert torch.allclose(raw[i].gate.flatten().double(), g)
        assert torch.allclose(tanh[i].gate.flatten().double(), g.tanh())
        o_base = attention_heads(model, i, x, None)
        d_raw = attention_heads(model, i, x, raw[i]) - o_base
        d_tanh = attention_heads(model, i, x, tanh[i]) - o_base
        assert d_tanh.abs().amax() > 1e-2  # the adapter term is far from negligible
        ratio = (g / g.tanh()).float()  # per head, in [1.03, 1.7]
        for h in range(CFG.n_heads):
            assert max_diff(d_raw[:, :, h], ratio[h] * d_tanh[:, :, h]) <= 1e-5, (i, h)
        # ... and it is per head: one shared factor does not fit every head.
        shared = d_raw.flatten().dot(d_tanh.flatten()) / d_tanh.flatten().dot(d_tanh.flatten())
        assert max_diff(d_raw, shared * d_tanh) > 1e-3


# --------------------------------------------------------------------- wrong variants caught


@pytest.mark.parametrize("gate_fn", ["raw", "tanh"])
def test_parity_check_catches_the_known_wrong_variants(files, gate_fn):
    """If the model scaled by sqrt(dim) or rotated the prompt, parity would fail by far."""
    model = loaded(files, "adapter", gate_fn=gate_fn)
    toks = tokens()
    got = prefill(model, toks)
    sd = {**files["base"], **files["adapter"]}
    kw = ref_kwargs(gate_fn)
    assert max_diff(got, reference_logits(sd, toks, **kw)) <= TOL_FP32
    wrong_scale = reference_logits(sd, toks, **kw, scale="dim")
    wrong_rope = reference_logits(sd, toks, **kw, rope_on_prompt=True)
    assert max_diff(got, wrong_scale) > 100 * TOL_FP32
    assert max_diff(got, wrong_rope) > 100 * TOL_FP32


def test_reference_is_self_consistent():
    """The reference itself: fp32 and fp64 runs agree, and a single head-dim pair rotates."""
    base, adapter = sharp_weights()
    sd = {**base, **adapter}
    toks = tokens(batch=2, length=6)
    a = reference_logits(sd, toks, **ref_kwargs())
    b = reference_logits(sd, toks, **ref_kwargs(), dtype=torch.float64)
    assert max_diff(a, b) <= TOL_FP32
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    out = rotate(x, torch.tensor([2]), 10000.0)  # pair frequencies 1 and 10000^(-1/2) = 0.01
    want = torch.tensor([[2.0, 2.0, 0.02, 0.02]], dtype=torch.float64)
    want[:, 0::2] = want[:, 0::2].cos()
    want[:, 1::2] = want[:, 1::2].sin()
    assert torch.allclose(out, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------- adapter K/V computed once per load


def test_adapter_kv_computed_once_at_prepare(files):
    sd = {**files["base"], **files["adapter"]}
    model = build(sd)
    assert sorted(model.adapter_kv) == ADAPTED
    prompts = sd["adapter_query.weight"].view(CFG.adapter_layer, CFG.adapter_len, CFG.dim)
    hd = CFG.dim // CFG.n_heads
    for j, i in enumerate(ADAPTED):
        wk = sd[f"layers.{i}.attention.wk.weight"]
        wv = sd[f"layers.{i}.attention.wv.weight"]
        want_k = (prompts[j] @ wk.T).view(CFG.adapter_len, CFG.n_heads, hd).transpose(0, 1)
        want_v = (prompts[j] @ wv.T).view(CFG.adapter_len, CFG.n_heads, hd).transpose(0, 1)
        assert max_diff(model.adapter_kv[i].k, want_k) <= TOL_FP32  # no RoPE on the prompt
        assert max_diff(model.adapter_kv[i].v, want_v) <= TOL_FP32

    calls: dict[int, list[tuple[int, ...]]] = {i: [] for i in range(CFG.n_layers)}
    hooks = [
        layer.attention.wk.register_forward_hook(
            lambda _m, args, _out, i=i: calls[i].append(tuple(args[0].shape))
        )
        for i, layer in enumerate(model.layers)
    ]
    toks = tokens()
    cache = model.new_cache(3)
    try:
        with torch.no_grad():
            model(toks[:, :PREFILL], 0, cache)
            assert all(c == [(3, PREFILL, CFG.dim)] for c in calls.values()), calls
            for c in calls.values():
                c.clear()
            before = model(toks[:, PREFILL : PREFILL + 1], PREFILL, cache)
            # A decode step: wk runs once per layer, on the new token only, never on the prompt.
            assert all(c == [(3, 1, CFG.dim)] for c in calls.values()), calls
    finally:
        for h in hooks:
            h.remove()

    # The cached K/V are what forward uses: changing the prompt does nothing until prepare().
    with torch.no_grad():
        model.adapter_query.weight.mul_(-1)
        cache = model.new_cache(3)
        model(toks[:, :PREFILL], 0, cache)
        same = model(toks[:, PREFILL : PREFILL + 1], PREFILL, cache)
        assert torch.equal(same, before)
        model.prepare()
        cache = model.new_cache(3)
        model(toks[:, :PREFILL], 0, cache)
        changed = model(toks[:, PREFILL : PREFILL + 1], PREFILL, cache)
        assert max_diff(changed, before) > 100 * TOL_FP32


def test_weight_layout_changes_storage_not_values_or_names(files):
    """lay_out_weights: column-major for one row, row-major for several; same state dict, same
    logits up to fp32 summation order, and load_state_dict still writes into the parameters."""
    sd = {**files["base"], **files["adapter"]}
    model = build(sd)
    toks = tokens()
    with torch.inference_mode():
        want = model(toks, 0, model.new_cache(3), all_logits=True)
        step = model(toks[:1], 0, model.new_cache(1))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * CFG.n_layers + 1

    model.lay_out_weights(rows=1)
    assert not any(m.weight.is_contiguous() for m in linears)
    assert all(
        b.attention.wqkv is not None and b.feed_forward.w13 is not None for b in model.layers
    )
    state = model.state_dict()
    assert state.keys() == sd.keys()
    assert all(torch.equal(state[k], sd[k].to(state[k].dtype)) for k in sd)
    with torch.inference_mode():
        assert max_diff(model(toks[:1], 0, model.new_cache(1)), step) <= TOL_FP32
        assert max_diff(model(toks, 0, model.new_cache(3), all_logits=True), want) <= TOL_FP32

    bumped = sd["layers.0.attention.wq.weight"] + 1
    model.load_state_dict({"layers.0.attention.wq.weight": bumped}, strict=False)
    assert torch.equal(model.layers[0].attention.wq.weight.detach(), bumped)

    model.lay_out_weights(rows=8)
    assert all(m.weight.is_contiguous() for m in linears)
    assert all(b.attention.wqkv is None and b.feed_forward.w13 is None for b in model.layers)
    assert torch.equal(model.layers[0].attention.wq.weight.detach(), bumped)
