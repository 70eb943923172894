import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    build_bundle,
    extracted_adapter,
    main,
    merge_meta_shards,
    params_json,
    save_hf_sharded,
    save_legacy,
    save_safetensors,
    save_zip,
    training_checkpoint,
    upstream_args,
    write_meta_dir,
)
from tests.trusted_load import load_training_checkpoint

CFG = TinyConfig()


def _load(path):
    return load_training_checkpoint(path)


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _all_tensors(v)


@pytest.mark.parametrize(
    ("dim", "multiple_of", "expected"), [(64, 32, 192), (4096, 256, 11008), (5120, 256, 13824)]
)
def test_ffn_hidden_formula(dim, multiple_of, expected):
    assert TinyConfig(dim=dim, multiple_of=multiple_of).ffn_hidden == expected


def test_base_shapes_and_dtypes():
    sd = base_state_dict(CFG)
    d, h, v = CFG.dim, CFG.ffn_hidden, CFG.vocab_size
    assert sd["tok_embeddings.weight"].shape == (v, d)
    assert sd["output.weight"].shape == (v, d)
    assert sd["norm.weight"].shape == (d,)
    for i in range(CFG.n_layers):
        p = f"layers.{i}."
        for n in "qkvo":
            assert sd[f"{p}attention.w{n}.weight"].shape == (d, d)
        assert sd[f"{p}feed_forward.w1.weight"].shape == (h, d)
        assert sd[f"{p}feed_forward.w2.weight"].shape == (d, h)
        assert sd[f"{p}feed_forward.w3.weight"].shape == (h, d)
        assert sd[f"{p}attention_norm.weight"].shape == (d,)
        assert sd[f"{p}ffn_norm.weight"].shape == (d,)
    assert len(sd) == 3 + 9 * CFG.n_layers
    assert all(t.dtype == torch.float16 for t in sd.values())
    norm = sd["norm.weight"].float()
    assert (norm - 1).abs().max() < 0.1
    assert 0.01 < sd["layers.0.attention.wq.weight"].float().std() < 0.03
    assert base_state_dict(CFG, dtype=torch.float32)["norm.weight"].dtype == torch.float32


@pytest.mark.parametrize("scalar", [False, True])
def test_adapter_gates(scalar):
    ad = adapter_tensors(CFG, scalar_gates=scalar)
    assert ad["adapter_query.weight"].shape == (CFG.adapter_layer * CFG.adapter_len, CFG.dim)
    assert all(t.dtype == torch.float32 for t in ad.values())
    shape = (1,) if scalar else (1, CFG.n_heads, 1, 1)
    for i in range(CFG.n_layers):
        gate = ad[f"layers.{i}.attention.gate"]
        assert gate.shape == shape
        if i >= CFG.n_layers - CFG.adapter_layer:
            assert (gate != 0).all()
            assert gate.abs().max() <= 0.3
        else:
            assert (gate == 0).all()


def test_extracted_adapter_lower_gates_fp16_zero():
    ad = adapter_tensors(CFG)
    ex = extracted_adapter(CFG, ad)
    assert set(ex) == set(ad)
    assert ex["adapter_query.weight"].dtype == torch.float32
    for i in range(CFG.n_layers):
        gate = ex[f"layers.{i}.attention.gate"]
        if i in CFG.adapted_layers:
            assert gate.dtype == torch.float32
            assert torch.equal(gate, ad[f"layers.{i}.attention.gate"])
        else:
            assert gate.dtype == torch.float16
            assert (gate == 0).all()


def test_params_json():
    p = params_json(CFG)
    assert p == {
        "dim": 64,
        "multiple_of": 32,
        "n_heads": 4,
        "n_layers": 4,
        "norm_eps": 1e-5,
        "vocab_size": 128,
    }
    assert params_json(CFG, vocab_size=-1)["vocab_size"] == -1


def test_training_checkpoint_roundtrip(tmp_path):
    base, ad = base_state_dict(CFG), adapter_tensors(CFG)
    ckpt = training_checkpoint(CFG, base, ad, epoch=4, args_overrides={"lr": 0.5})
    path = save_zip(ckpt, tmp_path / "checkpoint-4.pth")
    loaded = _load(path)
    assert set(loaded) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert loaded["epoch"] == 4
    assert set(loaded["model"]) == set(base) | set(ad)
    for k, v in base.items():
        assert loaded["model"][k].dtype == torch.float16
        assert torch.equal(loaded["model"][k], v)
    for k, v in ad.items():
        assert loaded["model"][k].dtype == torch.float32
        assert torch.equal(loaded["model"][k], v)
    args = loaded["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.adapter_len, args.adapter_layer, args.max_seq_len) == (4, 2, 64)
    assert (args.batch_size, args.epochs, args.model) == (4, 5, "llama7B_adapter")
    assert args.lr == 0.5
    opt = loaded["optimizer"]
    (group,) = opt["param_groups"]
    assert group["betas"] == (0.9, 0.95)
    assert (group["eps"], group["weight_decay"], group["amsgrad"]) == (1e-8, 0.02, False)
    assert group["params"] == list(range(1 + CFG.adapter_layer))
    assert sorted(opt["state"]) == group["params"]
    assert opt["state"][0]["exp_avg"].shape == ad["adapter_query.weight"].shape
    for s in opt["state"].values():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
        assert (s["exp_avg_sq"] >= 0).all()
        assert s["step"].ndim == 0
    assert loaded["scaler"]["scale"] == 65536.0
    assert loaded["scaler"]["growth_interval"] == 2000


def test_upstream_args_overrides():
    args = upstream_args(CFG, epochs=10, extra="x")
    assert (args.epochs, args.extra, args.adapter_len) == (10, "x", CFG.adapter_len)


def test_training_checkpoint_no_shared_storage():
    base, ad = base_state_dict(CFG), adapter_tensors(CFG)
    ckpt = training_checkpoint(CFG, base, ad)
    tensors = list(_all_tensors(ckpt))
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(ptrs)) == len(ptrs)
    inputs = {t.untyped_storage().data_ptr() for t in [*base.values(), *ad.values()]}
    assert not inputs & set(ptrs)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_shards_roundtrip(tmp_path, n_shards):
    base = base_state_dict(CFG)
    paths = write_meta_dir(base, tmp_path, CFG, n_shards=n_shards)
    assert [p.name for p in paths] == [f"consolidated.{k:02d}.pth" for k in range(n_shards)]
    assert json.loads((tmp_path / "params.json").read_text()) == params_json(CFG)
    shards = [_load(p) for p in paths]
    if n_shards == 2:
        s0 = shards[0]
        assert s0["layers.0.attention.wq.weight"].shape == (CFG.dim // 2, CFG.dim)
        assert s0["output.weight"].shape == (CFG.vocab_size // 2, CFG.dim)
        assert s0["layers.0.attention.wo.weight"].shape == (CFG.dim, CFG.dim // 2)
        assert s0["layers.0.feed_forward.w2.weight"].shape == (CFG.dim, CFG.ffn_hidden // 2)
        assert s0["tok_embeddings.weight"].shape == (CFG.vocab_size, CFG.dim // 2)
        assert torch.equal(s0["norm.weight"], shards[1]["norm.weight"])
    merged = merge_meta_shards(shards)
    assert merged.keys() == base.keys()
    for k, v in base.items():
        assert merged[k].dtype == v.dtype
        assert torch.equal(merged[k], v), k


def test_meta_shards_indivisible(tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        write_meta_dir(base_state_dict(CFG), tmp_path, CFG, n_shards=3)


def test_hf_sharded_index(tmp_path):
    base = base_state_dict(CFG)
    index_path = save_hf_sharded(base, tmp_path, n_shards=3)
    index = json.loads(index_path.read_text())
    assert set(index["weight_map"]) == set(base)
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    total = sum(t.numel() * t.element_size() for t in base.values())
    assert index["metadata"]["total_size"] == total
    loaded = {}
    for f in files:
        part = load_file(tmp_path / f)
        assert all(index["weight_map"][k] == f for k in part)
        loaded.update(part)
    assert all(torch.equal(loaded[k], v) for k, v in base.items())
    # contiguous groups: key order preserved across files
    assert list(index["weight_map"]) == list(base)


def test_safetensors_and_legacy_writers(tmp_path):
    ad = adapter_tensors(CFG)
    p = save_safetensors(ad, tmp_path / "a.safetensors", metadata={"format": "pt"})
    assert all(torch.equal(load_file(p)[k], v) for k, v in ad.items())
    lp = save_legacy(ad, tmp_path / "legacy.pth")
    with open(lp, "rb") as fh:
        assert fh.read(2) != b"PK"  # not a zip archive
    assert all(torch.equal(_load(lp)[k], v) for k, v in ad.items())


def test_determinism():
    b1, b2 = base_state_dict(CFG), base_state_dict(CFG)
    a1, a2 = adapter_tensors(CFG), adapter_tensors(CFG)
    c1, c2 = training_checkpoint(CFG, b1, a1), training_checkpoint(CFG, b2, a2)
    t1, t2 = list(_all_tensors(c1)), list(_all_tensors(c2))
    assert len(t1) == len(t2)
    assert all(torch.equal(x, y) for x, y in zip(t1, t2, strict=True))
    assert not torch.equal(base_state_dict(CFG, seed=5)["output.weight"], b1["output.weight"])


def test_no_global_rng_use():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    training_checkpoint(CFG, base_state_dict(CFG), adapter_tensors(CFG))
    assert torch.equal(torch.get_rng_state(), before)


def test_build_bundle_and_main(tmp_path, capsys):
    paths = build_bundle(tmp_path / "a")
    assert paths["base"] == tmp_path / "a" / "base" / "consolidated.00.pth"
    assert paths["params"].name == "params.json"
    assert paths["checkpoint"].name == "checkpoint-4.pth"
    base = _load(paths["base"])
    ckpt = _load(paths["checkpoint"])
    for k, v in base.items():
        assert torch.equal(ckpt["model"][k], v)
    main(["--out", str(tmp_path / "b")])
    assert "checkpoint-4.pth" in capsys.readouterr().out
    again = _load(tmp_path / "b" / "checkpoint-4.pth")
    assert all(torch.equal(again["model"][k], v) for k, v in ckpt["model"].items())
    total = sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert total < 1_000_000
