"""The committed adapter-family fixtures rebuild exactly and agree with expected.json."""

import argparse
import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from fixtures.families.multimodal import MM, extract_keys
from fixtures.families.peft_format import GATES
from fixtures.make_family_fixtures import (
    ALPACA,
    CFG,
    DEFAULT_OUT,
    INSTRUCTIONS,
    build_all,
    hf_permute,
    meta_base,
    meta_to_hf,
    train_tokenizer,
    v2_chat_trainables,
)
from tests.trusted_load import load_training_checkpoint

FAMILIES = DEFAULT_OUT
EXPECTED = json.loads((FAMILIES / "expected.json").read_text())
# Files not written by build_all: the expected tokens (upstream code), docs and the builders.
NOT_BUILT = {"expected.json", "expected_logits.safetensors", "README.md"}


def _load(path):
    return load_training_checkpoint(path)


def _committed() -> set[str]:
    return {
        p.relative_to(FAMILIES).as_posix()
        for p in FAMILIES.rglob("*")
        if p.is_file()
        and p.name not in NOT_BUILT
        and p.suffix not in (".py", ".pyc")
        and "__pycache__" not in p.parts
    }


def _same_versions() -> bool:
    """torch.save zip bytes and sentencepiece training are version-specific: compare bytes
    only under the versions that wrote the committed files, the content otherwise."""
    import safetensors

    v = EXPECTED["versions"]
    now = (torch.__version__, spm.__version__, safetensors.__version__)
    return now == (v["torch"], v["sentencepiece"], v["safetensors"])


def _assert_same_obj(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same_obj(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_obj(x, y, f"{where}[{i}]")
    elif isinstance(a, argparse.Namespace):
        assert vars(a) == vars(b), where
    else:
        assert a == b, where


def _assert_same_file(new: Path, old: Path) -> None:
    if new.read_bytes() == old.read_bytes():
        return
    assert not _same_versions(), f"{old} does not rebuild byte for byte"
    if old.suffix in (".pth", ".bin"):
        _assert_same_obj(_load(new), _load(old), old.name)
    elif old.suffix == ".safetensors":
        with safe_open(new, "pt") as f, safe_open(old, "pt") as g:
            assert f.metadata() == g.metadata()
            assert sorted(f.keys()) == sorted(g.keys())
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                _assert_same_obj(f.get_tensor(k), g.get_tensor(k), k)
    elif old.suffix == ".json":
        assert json.loads(new.read_text()) == json.loads(old.read_text())
    else:  # tokenizer.model
        sp_new = spm.SentencePieceProcessor(model_proto=new.read_bytes())
        sp_old = spm.SentencePieceProcessor(model_proto=old.read_bytes())
        pieces = [(sp.id_to_piece(i), sp.get_score(i)) for sp in (sp_new,) for i in range(len(sp))]
        assert pieces == [(sp_old.id_to_piece(i), sp_old.get_score(i)) for i in range(len(sp_old))]


def test_rebuild_matches_committed(tmp_path):
    written = build_all(tmp_path)
    rebuilt = {p.relative_to(tmp_path).as_posix() for p in written}
    assert rebuilt == _committed()
    for rel in sorted(rebuilt):
        _assert_same_file(tmp_path / rel, FAMILIES / rel)


def test_dir_stays_small():
    total = sum((FAMILIES / rel).stat().st_size for rel in _committed() | NOT_BUILT)
    assert total < 3_600_000  # five copies of a 246k-parameter fp16 base, little else


def test_tokenizer_training_is_deterministic():
    assert train_tokenizer() == train_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=str(FAMILIES / "tokenizer.model"))
    assert (len(sp), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (256, 0, 1, 2, -1)


def test_builders_leave_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    v2_chat_trainables(meta_base(), prompts_seed=1)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("fixture", sorted(EXPECTED["runs"]))
def test_expected_tokens_consistent(fixture):
    sp = spm.SentencePieceProcessor(model_file=str(FAMILIES / "tokenizer.model"))
    run = EXPECTED["runs"][fixture]
    assert EXPECTED["template"] == ALPACA
    assert [r["instruction"] for r in run["results"]] == list(INSTRUCTIONS)
    for r in run["results"]:
        ids = [sp.bos_id(), *sp.encode(ALPACA.format(instruction=r["instruction"]))]
        assert r["prompt_ids"] == ids
        gen = r["generated_ids"]
        assert len(gen) <= EXPECTED["max_new_tokens"] < 32
        assert all(0 <= t < len(sp) and t != sp.eos_id() for t in gen)
        assert r["min_gap"] > 1e-3
    assert run["min_gap"] == min(r["min_gap"] for r in run["results"])
    assert run["min_gap"] > 0.05  # far above fp32 noise and the fp16-cast effect below


def test_expected_cross_checks():
    runs = EXPECTED["runs"]
    meta, hf = runs["meta-base"]["results"], runs["hf-base"]["results"]
    assert [r["generated_ids"] for r in meta] == [r["generated_ids"] for r in hf]
    assert runs["hf-base"]["max_abs_logit_diff_vs_meta_upstream"] <= 5e-4
    assert runs["hf-base"]["save_pretrained_bytes_equal"]["model.safetensors"]
    assert runs["hf-base"]["save_pretrained_bytes_equal"]["config.json"]
    assert any(runs["v2-chat"]["differs_from_meta-base"])
    assert any(runs["v2-chat-prompts"]["differs_from_v2-chat"])
    assert any(runs["peft-adaption-prompt"]["differs_from_hf-base"])
    casts = runs["v2-chat-prompts"]["fp16_casts"]
    assert casts["same_tokens_without_casts"]
    assert casts["max_abs_logit_diff"] < runs["v2-chat-prompts"]["min_gap"] / 5
    for fixture in ("v2-chat", "v2-chat-prompts"):
        loaded = runs[fixture]["loaded"]
        assert (
            loaded["file_keys_loaded"] == loaded["file_keys"] and not loaded["file_keys_not_loaded"]
        )
    peft = runs["peft-adaption-prompt"]
    assert peft["loaded"]["peft_save_same_tensors"]
    assert peft["loaded"]["peft_save_config_bytes_equal"]
    mm = EXPECTED["v2_multimodal"]
    for name in ("checkpoint-0", "lora_state_dict"):
        assert mm[name]["strict_load"] == "<All keys matched successfully>"
    for name in ("BIAS-tiny", "LORA-BIAS-tiny"):
        assert mm[name]["same_keys_order_tensors"] and not mm[name]["upstream_load_unexpected_keys"]


def test_expected_first_step_logits():
    """expected_logits.safetensors: each prompt's first-step logits from the family's code."""
    with safe_open(FAMILIES / "expected_logits.safetensors", "pt") as f:
        logits = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(logits) == set(EXPECTED["runs"])
    for fixture, run in EXPECTED["runs"].items():
        assert logits[fixture].shape == (len(INSTRUCTIONS), CFG.vocab_size)
        assert logits[fixture].dtype == torch.float32
        for row, r in zip(logits[fixture], run["results"], strict=True):
            top = torch.topk(row.double(), 2)
            first = r["generated_ids"][0] if r["generated_ids"] else EXPECTED["eos_id"]
            assert int(top.indices[0]) == first
            assert float(top.values[0] - top.values[1]) >= r["min_gap"]
    torch.testing.assert_close(logits["hf-base"], logits["meta-base"], rtol=0, atol=5e-4)


def test_peft_full_keys_recorded():
    keys = EXPECTED["runs"]["peft-adaption-prompt"]["peft_full"]["keys"]
    with safe_open(FAMILIES / "peft-full" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(keys)
    assert list(_load(FAMILIES / "peft-full" / "pytorch_model.bin")) == keys
    assert "base_model.model.model.layers.3.self_attn.model.q_proj.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.weight" in keys


def test_v2_chat_layout():
    chat = _load(FAMILIES / "v2-chat" / "adapter.pth")
    prompts = _load(FAMILIES / "v2-chat-prompts" / "adapter.pth")
    assert list(chat) == list(prompts) == ["model"]
    d, h, n = CFG.dim, CFG.ffn_hidden, CFG.n_layers
    sizes = {"w1_bias": h, "w3_bias": h, "w2_bias": d, "w1_scale": d, "w3_scale": d, "w2_scale": h}
    for i in range(n):
        for k in "qkvo":
            for kind in ("bias", "scale"):
                assert chat["model"][f"layers.{i}.attention.w{k}_{kind}"].shape == (d,)
        for name, size in sizes.items():
            assert chat["model"][f"layers.{i}.feed_forward.{name}"].shape == (size,)
    assert len(chat["model"]) == n * (8 + 6 + 2)
    assert all(t.dtype == torch.float32 for t in prompts["model"].values())
    extra = set(prompts["model"]) - set(chat["model"])
    adapted = [n - 2, n - 1]
    assert extra == {"adapter_query.weight"} | {f"layers.{i}.attention.gate" for i in adapted}
    assert prompts["model"]["adapter_query.weight"].shape == (CFG.adapter_len * 2, d)
    for i in adapted:
        gate = prompts["model"][f"layers.{i}.attention.gate"]
        assert gate.shape == (1, CFG.n_heads, 1, 1)
        assert ((gate.abs() >= 0.3) & (gate.abs() <= 1.5)).all()
    ckpt = _load(FAMILIES / "v2-chat-prompts" / "checkpoint-1.pth")
    assert list(ckpt) == ["model", "optimizer", "epoch", "scaler", "args"]
    _assert_same_obj(ckpt["model"], prompts["model"], "checkpoint-1 model")
    args = ckpt["args"]
    assert (args.adapter_len, args.adapter_layer, args.model) == (
        5,
        2,
        "Llama65B_bias_scale_norm_tuning",
    )
    groups = ckpt["optimizer"]["param_groups"]
    assert sorted(ckpt["optimizer"]["state"]) == sorted(i for g in groups for i in g["params"])
    assert len(ckpt["optimizer"]["state"]) == len(prompts["model"])


def test_v2_multimodal_layout():
    keys = json.loads((FAMILIES / "v2-multimodal" / "expected_keys.json").read_text())
    ckpt = _load(FAMILIES / "v2-multimodal" / "checkpoint-0.pth")
    sd = ckpt["model"]
    assert ckpt["epoch"] == 0 and isinstance(ckpt["args"], argparse.Namespace)
    for kind, name in (("BIAS", "BIAS-tiny.pth"), ("LORA", "LORA-BIAS-tiny.pth")):
        release = _load(FAMILIES / "v2-multimodal" / name)
        assert list(release["model"]) == keys[kind] == extract_keys(kind)
        assert release["config"] == {"w_bias": True, "w_lora": kind == "LORA", "lora_rank": 4}
    bias = _load(FAMILIES / "v2-multimodal" / "BIAS-tiny.pth")["model"]
    _assert_same_obj(bias, {k: sd[k] for k in keys["BIAS"]}, "BIAS-tiny vs checkpoint-0")
    assert not any("lora" in k or "new_gate" in k for k in sd)
    c = MM.v_embed_dim
    assert sd["visual_blocks.0.attn.qkv.weight"].shape == (3 * c, c)
    assert sd["visual_blocks.1.mlp.fc1.weight"].shape == (MM.v_mlp_ratio * c, c)
    assert sd["clip_proj.weight"].shape == (c, MM.clip_dim)
    assert sd["visual_proj.weight"].shape == (CFG.dim, c)
    assert sd["adapter_query.weight"].shape == (MM.query_len * MM.query_layer, CFG.dim)
    assert sd["visual_query.weight"].shape == (MM.query_len, c)
    assert sd["clip.visual.proj"].shape[1] == MM.clip_dim
    assert not any(k.startswith("clip.transformer.") for k in sd)  # upstream deletes it
    base = meta_base()
    for k, v in base.items():  # the frozen base as is; its norms were trained (fp32)
        t = sd["llama." + k]
        assert t.dtype == (torch.float32 if "norm" in k else torch.float16), k
        assert "norm" in k or torch.equal(t, v), k
    assert sd["llama.layers.0.attention.gate"].abs().max() == 0  # not adapted
    for i in range(1, CFG.n_layers):
        assert sd[f"llama.layers.{i}.attention.gate"].dtype == torch.float16
        assert sd[f"llama.layers.{i}.attention.gate"].abs().min() >= 0.29
    assert sd["llama.layers.0.attention.wq.bias"].dtype == torch.float32
    assert sd["llama.norm.weight"].dtype == torch.float32
    lora = _load(FAMILIES / "v2-multimodal" / "LORA-BIAS-tiny.pth")["model"]
    r, d, h = MM.lora_rank, CFG.dim, CFG.ffn_hidden
    assert lora["llama.layers.2.attention.lora_wq_l1.weight"].shape == (r, d)
    assert lora["llama.layers.2.attention.lora_wq_l2.weight"].shape == (d, r)
    assert lora["llama.layers.2.feed_forward.lora_w2_l1.weight"].shape == (r, h)
    assert lora["llama.layers.2.feed_forward.lora_w1_l2.weight"].shape == (h, r)
    assert lora["llama.layers.2.attention.new_gate"].shape == (1, 1, 1, 1)


def test_peft_adapter_layout():
    cfg = json.loads((FAMILIES / "peft-adaption-prompt" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADAPTION_PROMPT" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["adapter_len"], cfg["adapter_layers"], cfg["target_modules"]) == (5, 2, "self_attn")
    with safe_open(FAMILIES / "peft-adaption-prompt" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    p = "base_model.model.model.layers.{}.self_attn.adaption_{}"
    assert set(t) == {p.format(i, n) for i in (2, 3) for n in ("prompt", "gate")}
    assert t[p.format(2, "prompt")].shape == (1, CFG.adapter_len, CFG.dim)
    assert [round(float(t[p.format(i, "gate")]), 3) for i in (2, 3)] == list(GATES)
    assert all(torch.equal(v, v.half().float()) for v in t.values())  # exact in the fp16 full


def _rope(x: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """x [T, H, hd]: Meta rotates (2i, 2i+1) pairs, HF rotates (i, i + hd/2) halves."""
    t, _, hd = x.shape
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.outer(torch.arange(t).double(), freqs)[:, None, :]
    cos, sin = ang.cos(), ang.sin()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(2)
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def test_hf_permutation_matches_meta_rope():
    """Scores q.k with the permuted HF weights under rotate-half RoPE equal Meta's."""
    base, hf = meta_base(), meta_to_hf(meta_base())
    h, hd = CFG.n_heads, CFG.dim // CFG.n_heads
    x = torch.randn(6, CFG.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = []
    for names, interleaved in (
        (("layers.1.attention.wq.weight", "layers.1.attention.wk.weight"), True),
        (
            ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"),
            False,
        ),
    ):
        sd = base if interleaved else hf
        q, k = ((x @ sd[n].double().T).view(6, h, hd) for n in names)
        q, k = _rope(q, interleaved=interleaved), _rope(k, interleaved=interleaved)
        scores.append(torch.einsum("qhd,khd->hqk", q, k))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-10)
    w = base["layers.0.attention.wq.weight"]
    assert not torch.equal(hf_permute(w, h), w)
    assert math.isclose(float(hf_permute(w, h).float().norm()), float(w.float().norm()))


def test_content_compare_catches_changes(tmp_path, monkeypatch):
    """Under other library versions the rebuild is compared by content: make sure that path
    accepts a re-save and rejects a one-element change."""
    monkeypatch.setattr(f"{__name__}._same_versions", lambda: False)
    old = FAMILIES / "v2-chat-prompts" / "checkpoint-1.pth"
    ckpt = _load(old)
    torch.save(ckpt, tmp_path / "resaved.pth", _use_new_zipfile_serialization=False)
    _assert_same_file(tmp_path / "resaved.pth", old)
    ckpt["model"]["layers.3.attention.gate"][0, 1, 0, 0] += 1e-6
    torch.save(ckpt, tmp_path / "changed.pth")
    with pytest.raises(AssertionError, match="gate"):
        _assert_same_file(tmp_path / "changed.pth", old)
