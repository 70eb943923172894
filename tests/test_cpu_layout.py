"""The CPU weight layout (cpu_layout.py): cast straight into the layout at load (load_base with
``rows``) gives the same model as a cast followed by the layout, bit for bit; laid out for one
row or several, from fp16 and from fp32 files."""

from __future__ import annotations

import pytest
import torch

from ckpt_doctor import loading
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import TinyConfig, write_meta_dir

CFG = TinyConfig(dim=640, n_layers=2, n_heads=5, vocab_size=300, multiple_of=64)  # dim > 512


@pytest.fixture(scope="module", params=["float16", "float32"])
def wide_base(request, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    d, h = CFG.dim, CFG.ffn_hidden
    sd = {"tok_embeddings.weight": torch.randn(CFG.vocab_size, d, generator=g)}
    for i in range(CFG.n_layers):
        for w in "qkvo":
            sd[f"layers.{i}.attention.w{w}.weight"] = torch.randn(d, d, generator=g) * 0.05
        sd[f"layers.{i}.feed_forward.w1.weight"] = torch.randn(h, d, generator=g) * 0.05
        sd[f"layers.{i}.feed_forward.w2.weight"] = torch.randn(d, h, generator=g) * 0.05
        sd[f"layers.{i}.feed_forward.w3.weight"] = torch.randn(h, d, generator=g) * 0.05
        sd[f"layers.{i}.attention_norm.weight"] = torch.ones(d)
        sd[f"layers.{i}.ffn_norm.weight"] = torch.ones(d)
    sd["norm.weight"] = torch.ones(d)
    sd["output.weight"] = torch.randn(CFG.vocab_size, d, generator=g) * 0.05
    sd = {k: v.to(getattr(torch, request.param)) for k, v in sd.items()}
    out = tmp_path_factory.mktemp(request.param) / "base"
    write_meta_dir(sd, out, CFG)
    return out


@pytest.mark.parametrize("rows", [1, 3])
def test_cast_into_the_layout_equals_cast_then_layout(wide_base, rows, one_thread):
    with open_checkpoint(wide_base) as base:
        plain = loading.load_base(base, max_seq_len=32)
        plain.lay_out_weights(rows=rows)  # what generate() does on a model loaded without rows
        direct = loading.load_base(base, max_seq_len=32, rows=rows)
    a, b = plain.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    assert all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    for m in (plain, direct):  # laid out alike: fused buffers for one row, none for several
        attn = m.layers[0].attention
        assert (attn.wqkv is not None) is (rows == 1)
        assert attn.wq.weight.is_contiguous() is (rows != 1)
    direct.lay_out_weights(rows=rows)  # generate() finds it laid out: nothing copied again
    assert (
        direct.layers[0].attention.wq.weight.data_ptr()
        == b["layers.0.attention.wq.weight"].data_ptr()
    )
    tokens = torch.tensor([[1, 5, 9, 200], [2, 6, 7, 8], [3, 3, 3, 3]])[:rows]
    with torch.inference_mode():
        want = plain(tokens, 0, plain.new_cache(rows, 32))
        got = direct(tokens, 0, direct.new_cache(rows, 32))
    assert torch.equal(got, want)
