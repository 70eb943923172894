"""Every adapter family is named and checked by its own rules (static commands: inspect, diff,
extract, repair, verify's static checks), and never mistaken for a failed v1 load.

Files are built in temporary directories by tests/family_files.py, as each family's own code
writes them; the commands that run the reference model are in test_family_runs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    hf_config,
    hf_state_dict,
    save_safetensors,
    save_zip,
    training_checkpoint,
    write_meta_dir,
)
from tests import family_files as ff

CFG = TinyConfig()
runner = CliRunner()


def run(*args: object) -> tuple[int, dict]:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    return result.exit_code, json.loads(result.stdout)


def ids(doc: dict) -> dict[str, str]:
    return {f["id"]: f["severity"] for f in doc["findings"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A Meta base dir, its HF copy, and one file per family, for TinyConfig."""
    root = tmp_path_factory.mktemp("families")
    base = base_state_dict(CFG)
    write_meta_dir(base, root / "base", CFG)
    hf_dir = root / "hf"
    save_safetensors(hf_state_dict(base, CFG.n_heads), hf_dir / "model.safetensors")
    (hf_dir / "config.json").write_text(json.dumps(hf_config(CFG)))
    files = {"base": root / "base", "hf": hf_dir}
    chat = ff.v2_chat(CFG, prompt=False)
    chat_p = ff.v2_chat(CFG, prompt=True)
    files["chat"] = save_zip({"model": chat}, root / "chat.pth")
    files["chat_ckpt"] = save_zip(ff.v2_chat_checkpoint(chat_p), root / "chat-ckpt.pth")
    files["chat_flat"] = save_zip(chat_p, root / "chat-flat.pth")
    for lora in (False, True):
        name = "mm_lora" if lora else "mm"
        trained = ff.v2_multimodal(CFG, lora=lora)
        files[name] = save_zip(ff.v2_multimodal_release(trained, lora=lora), root / f"{name}.pth")
        training = ff.v2_multimodal_training(base, trained)
        files[f"{name}_ckpt"] = save_zip(training, root / f"{name}-ckpt.pth")
    files["peft"] = ff.peft_adapter_dir(root / "peft", CFG)
    full = ff.peft_full_state(hf_state_dict(base, CFG.n_heads), files["peft"])
    files["peft_full"] = save_zip(full, root / "peft-full" / "pytorch_model.bin")
    (root / "peft-full" / "config.json").write_text(json.dumps(hf_config(CFG)))
    lit_base, lit_adapter = ff.litgpt_v2(CFG)
    files["litgpt_base"] = save_zip(lit_base, root / "lit_model.pth")
    files["litgpt_v2"] = save_zip({"model": lit_adapter}, root / "lit_model.pth.adapter_v2")
    files["litgpt_v2_full"] = save_zip(ff.litgpt_v2_full(lit_base, lit_adapter), root / "full.pth")
    lit_llama = {
        f"transformer.h.{i}.attn.{k}": v
        for i in (2, 3)
        for k, v in (
            ("adapter_wte.weight", torch.randn(6, CFG.dim)),
            ("gating_factor", torch.full((1, CFG.n_heads, 1, 1), 0.2)),
        )
    }
    files["lit_llama"] = save_zip(lit_llama, root / "lit-llama-adapter.pth")
    # PEFT's IA3 (a learned [out, 1] scale per targeted linear): a format ckpt-doctor does not know.
    lora = {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.zeros(64, 1)}
    files["unknown"] = save_safetensors(lora, root / "unknown" / "adapter_model.safetensors")
    return files


@pytest.mark.parametrize(
    ("name", "family", "length", "layers"),
    [
        ("chat", "llama-adapter-v2-chat", None, 0),
        ("chat_ckpt", "llama-adapter-v2-chat", 5, 2),
        ("mm", "llama-adapter-v2-multimodal", 4, 3),
        ("mm_lora", "llama-adapter-v2-multimodal", 4, 3),
        ("mm_ckpt", "llama-adapter-v2-multimodal", 4, 3),
        ("peft", "peft-adaption-prompt", 5, 2),
        ("peft_full", "peft-adaption-prompt", 5, 2),
        ("litgpt_v2", "litgpt-adapter-v2", 6, 3),
        ("lit_llama", "lit-llama-adapter", 6, 2),
        ("unknown", "unknown", None, None),
    ],
)
def test_each_family_is_named_with_its_config(tiny, name, family, length, layers):
    code, doc = run("inspect", tiny[name])
    adapter = doc["adapter"]
    assert adapter["family"] == family
    assert (adapter["adapter_len"], adapter["adapter_layer"]) == (length, layers)
    found = ids(doc)
    # A family's own prefix (llama., base_model.model.) and layout are not a problem.
    assert not {"KEY_PREFIX", "LOAD_NOTHING", "LOAD_FAILS", "GATE_SHAPE"} & set(found), found
    if family == "unknown":
        assert found == {"ADAPTER_UNKNOWN": "warning"} and code == 1


def test_every_trained_tensor_is_counted(tiny):
    """litgpt adapter_v2 trains adapter_bias / adapter_scale and the norms as well as the
    prompts and gates: all of them are the adapter, not 'litgpt-adapter, 6 tensors'."""
    _, lit_adapter = ff.litgpt_v2(CFG)
    _, doc = run("inspect", tiny["litgpt_v2"])
    assert doc["adapter"]["tensors"] == len(lit_adapter)
    _, doc = run("inspect", tiny["chat_ckpt"])
    assert doc["adapter"]["tensors"] == len(ff.v2_chat(CFG, prompt=True))


def test_v2_chat_norms_are_trained_not_drifted(tiny):
    """v2 chat trains attention_norm / ffn_norm (in fp32): against the base they are the
    adapter, not BASE_MODIFIED, not DTYPE_CHANGED."""
    _, doc = run("inspect", tiny["chat"], "--base", tiny["base"])
    assert not {"BASE_MODIFIED", "DTYPE_CHANGED", "LOAD_NOTHING"} & set(ids(doc)), ids(doc)
    _, doc = run("diff", tiny["chat_ckpt"], "--base", tiny["base"])
    adapter = set(doc["adapter"])
    assert "layers.0.attention_norm.weight" in adapter and doc["family"] == "llama-adapter-v2-chat"


def test_a_flat_v2_chat_file_does_not_load_upstream(tiny):
    """chat_demo.py indexes torch.load(path)['model']: a flat file raises KeyError there."""
    code, doc = run("inspect", tiny["chat_flat"])
    assert code == 1 and ids(doc).get("LOAD_FAILS") == "error"
    (fails,) = [f for f in doc["findings"] if f["id"] == "LOAD_FAILS"]
    assert "KeyError: 'model'" in fails["message"]


def test_peft_full_state_dict_is_not_missing_tensors(tiny):
    """A PeftModel's state dict names wrapped attention modules self_attn.model.q_proj: the
    base tensors are all there (no false MISSING_TENSORS) and equal the HF base."""
    _, doc = run("inspect", tiny["peft_full"], "--base", tiny["hf"])
    assert "MISSING_TENSORS" not in ids(doc), ids(doc)
    assert doc["diff_counts"]["removed"] == 0 and doc["diff_counts"]["added"] == 4
    _, doc = run("inspect", tiny["peft_full"], "--base", tiny["base"])  # and the Meta base
    assert doc["diff_counts"]["removed"] == 0 and doc["diff_counts"]["modified"] == 0


def test_litgpt_v2_frozen_linear_names_match_the_base(tiny):
    """adapter_v2 keeps its frozen weights as <linear>.linear.weight: the same tensors as the
    base's <linear>.weight, identical, not added + removed."""
    _, doc = run("diff", tiny["litgpt_v2_full"], "--base", tiny["litgpt_base"])
    counts = doc["counts"]
    assert counts["removed"] == 0, counts
    modified = {t["name"] for t in doc["tensors"] if t["status"] == "modified"}
    assert modified <= set(doc["adapter"])  # only the trained norms changed
    _, lit_adapter = ff.litgpt_v2(CFG)
    trained_new = [k for k in lit_adapter if "norm_" not in k and "ln_f" not in k]
    assert counts["added"] == len(trained_new) and counts["identical"] == len(lit_base())


def lit_base() -> list[str]:
    """litgpt base tensors the adapter does not train (frozen linears and the embedding)."""
    base, _ = ff.litgpt_v2(CFG)
    return [k for k in base if "norm_" not in k and "ln_f" not in k]


def test_gate_tables_say_each_familys_gate_function(tiny):
    from ckpt_doctor.families import describe, family_named

    want = {
        "chat_ckpt": "G = tanh(g) in training and inference",
        "peft": "G = g in training and inference",
        "lit_llama": "G = g in training and inference",
    }
    for name, text in want.items():
        _, doc = run("inspect", tiny[name])
        assert describe(family_named(doc["adapter"]["family"])) == text
    assert describe(family_named("llama-adapter-v1")) == (
        "G = g at raw inference, tanh(g) in training"
    )
    result = runner.invoke(app, ["inspect", str(tiny["chat_ckpt"])])
    assert "tanh(g) in training and inference" in " ".join(result.stdout.split())


def _fsdp(name: str) -> str:
    """How FSDP + activation checkpointing wrap a LLaMA's parameters (root and per layer)."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return (
            f"_fsdp_wrapped_module.layers.{i}._fsdp_wrapped_module."
            f"_checkpoint_wrapped_module.{rest}"
        )
    return f"_fsdp_wrapped_module.{name}"


@pytest.mark.parametrize("wrap", ["fsdp", "ddp+compile+fsdp"])
def test_fsdp_and_stacked_wrappers_resolve(tmp_path, tiny, wrap):
    """Wrapper segments anywhere in a name, stacked in any order: the v1 adapter is found, the
    diff against the base is clean, KEY_PREFIX names the wrappers and repair removes them."""
    ckpt = training_checkpoint(CFG, base_state_dict(CFG), adapter_tensors(CFG))
    named = {_fsdp(k): v for k, v in ckpt["model"].items()}
    if wrap != "fsdp":
        named = {f"_orig_mod.module.{k}": v for k, v in named.items()}
    ckpt["model"] = named
    path = save_zip(ckpt, tmp_path / "fsdp.pth")
    code, doc = run("inspect", path, "--base", tiny["base"])
    assert doc["adapter"]["family"] == "llama-adapter-v1"
    assert doc["diff_counts"]["added"] == 5 and doc["diff_counts"]["identical"] == 39
    (prefix,) = [f for f in doc["findings"] if f["id"] == "KEY_PREFIX"]
    assert "_fsdp_wrapped_module." in prefix["message"]
    code, doc = run("repair", path, "-o", tmp_path / "fixed.pth")
    assert code == 0, doc
    fixed = torch.load(tmp_path / "fixed.pth", weights_only=True)
    assert set(fixed) == set(base_state_dict(CFG)) | set(adapter_tensors(CFG))


def test_repair_keeps_a_familys_own_prefix(tmp_path, tiny):
    """llama. is v2 multimodal's own naming (its loader asserts no unexpected keys): repair
    drops the training entries and keeps the names, and the {'model', 'config'} layout."""
    out = tmp_path / "mm-fixed.pth"
    code, doc = run("repair", tiny["mm_ckpt"], "-o", out)
    assert code == 0 and [c["kind"] for c in doc["changes"]] == ["unwrap", "wrote"]
    fixed = torch.load(out, weights_only=True)
    source = torch.load(tiny["mm_ckpt"], weights_only=False)["model"]
    assert set(fixed) == {"model", "config"} and set(fixed["model"]) == set(source)


def test_v2_multimodal_extract_keeps_upstreams_key_list(tmp_path, tiny):
    """extract of a multimodal training checkpoint gives the released adapter shape: exactly
    the keys upstream's extract keeps (no frozen CLIP or LLaMA weights), and its config."""
    for lora in (False, True):
        name = "mm_lora" if lora else "mm"
        out = tmp_path / f"{name}-adapter.pth"
        code, doc = run("extract", tiny[f"{name}_ckpt"], "--base", tiny["base"], "-o", out)
        assert code == 0, ids(doc)
        written = torch.load(out, weights_only=True)
        expected = ff.v2_multimodal(CFG, lora=lora)
        assert set(written["model"]) == set(expected)
        assert all(torch.equal(written["model"][k], v) for k, v in expected.items())
        assert written["config"] == {"w_bias": True, "w_lora": lora, "lora_rank": 4 if lora else 16}
        code, doc = run("verify", out, "--base", tiny["base"], "--full", tiny[f"{name}_ckpt"])
        assert code == 0 and doc["passed"], doc
        skipped = {c["name"] for c in doc["checks"] if c["status"] == "not run"}
        assert skipped == {"strict load", "same logits"}


def test_v2_chat_extract_writes_its_own_layout(tmp_path, tiny):
    out = tmp_path / "chat-adapter.pth"
    code, doc = run("extract", tiny["chat_ckpt"], "--base", tiny["base"], "-o", out)
    assert code == 0, ids(doc)
    written = torch.load(out, weights_only=True)
    assert set(written) == {"model"}
    assert set(written["model"]) == set(ff.v2_chat(CFG, prompt=True))
    code, doc = run("extract", tiny["chat_ckpt"], "-o", tmp_path / "chat.safetensors")
    assert code == 2 and "torch.load" in doc["error"]["message"]  # upstream could not load it


def test_peft_extract_from_a_full_state_dict_gives_an_adapter_dir(tmp_path, tiny):
    """A Trainer's full PEFT state dict -> adapter_model.safetensors + adapter_config.json with
    PEFT's own names, the tensors bit for bit."""
    from safetensors.torch import load_file

    out = tmp_path / "extracted"
    code, doc = run("extract", tiny["peft_full"], "-o", out)
    assert code == 0, ids(doc)
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(tiny["peft"] / "adapter_model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT"
    assert (config["adapter_len"], config["adapter_layers"]) == (5, 2)
    code, doc = run("extract", tiny["peft_full"], "-o", tmp_path / "x.safetensors")
    assert code == 2 and "directory" in doc["error"]["message"]


def test_an_hf_base_is_a_base(tiny):
    _, doc = run("inspect", tiny["hf"])
    assert doc["adapter"] is None and not {"LOAD_NOTHING", "KEY_PREFIX"} & set(ids(doc))


def test_a_single_hf_or_meta_file_reads_the_config_beside_it(tmp_path, tiny):
    """config.json beside model.safetensors gives the head count HF's rotary layout needs
    (head_dim 16 here, not LLaMA's usual 128): wq / wk are the base's, not 'modified'."""
    _, doc = run("diff", tiny["hf"] / "model.safetensors", "--base", tiny["base"])
    assert doc["counts"]["identical"] == len(base_state_dict(CFG)), doc["counts"]
    _, doc = run("inspect", tiny["base"] / "consolidated.00.pth")
    assert doc["model"]["sources"]["n_heads"] == "params.json"


def test_a_base_saved_in_bf16_is_named_rounded(tmp_path, tiny):
    """A full checkpoint whose frozen tensors were saved in bf16: BASE_ROUNDED with the size
    of the change (not a silent DTYPE_CHANGED), and verify reproduces its logits once the base
    is rounded the same way, instead of blaming the adapter."""
    ckpt = training_checkpoint(CFG, base_state_dict(CFG), adapter_tensors(CFG))
    ckpt["model"] = {
        k: v.to(torch.bfloat16) if k in base_state_dict(CFG) else v
        for k, v in ckpt["model"].items()
    }
    full = save_zip(ckpt, tmp_path / "bf16.pth")
    _, doc = run("inspect", full, "--base", tiny["base"])
    (rounded,) = [f for f in doc["findings"] if f["id"] == "BASE_ROUNDED"]
    assert rounded["severity"] == "warning" and rounded["evidence"]["max_abs"] > 0
    out = tmp_path / "adapter.safetensors"
    assert run("extract", full, "--base", tiny["base"], "-o", out)[0] == 1  # BASE_ROUNDED
    _, doc = run("verify", out, "--base", tiny["base"], "--full", full)
    logits = next(c for c in doc["checks"] if c["name"] == "same logits")
    assert logits["passed"] and "BASE_ROUNDED" in logits["detail"], logits
    assert "LOGITS_DIFFER" not in ids(doc)


@pytest.mark.parametrize("command", ["extract", "repair", "verify"])
def test_an_unknown_adapter_is_refused(tmp_path, tiny, command):
    args = {
        "extract": ["extract", tiny["unknown"], "-o", tmp_path / "o.safetensors"],
        "repair": ["repair", tiny["unknown"], "-o", tmp_path / "o.safetensors"],
        "verify": ["verify", tiny["unknown"], "--base", tiny["base"]],
    }[command]
    code, doc = run(*args)
    assert code == 2 and "does not know this adapter format" in doc["error"]["message"]


def test_convert_refuses_what_is_not_exact(tmp_path, tiny):
    code, doc = run(
        "convert", tiny["litgpt_v2"], "--to", "llama-adapter-v1", "-o", tmp_path / "o.pth"
    )
    assert code == 2 and "qkv" in doc["error"]["message"]
    code, doc = run(
        "convert", tiny["chat_ckpt"], "--to", "peft-adaption-prompt", "-o", tmp_path / "p"
    )
    assert code == 2 and "bias" in doc["error"]["message"]
    # v1 gates differ per head: PEFT has one gate per layer.
    v1 = save_zip(
        training_checkpoint(CFG, base_state_dict(CFG), adapter_tensors(CFG)), tmp_path / "v1.pth"
    )
    code, doc = run(
        "convert", v1, "--to", "peft-adaption-prompt", "-o", tmp_path / "p", "--base", tiny["base"]
    )
    assert code == 2 and "spread" in doc["error"]["message"]


def test_lit_llama_converts_to_v1(tmp_path, tiny):
    out = tmp_path / "v1.safetensors"
    code, doc = run(
        "convert", tiny["lit_llama"], "--to", "llama-adapter-v1", "-o", out, "--base", tiny["base"]
    )
    assert code == 0, doc
    code, doc = run("inspect", out)
    assert doc["adapter"]["family"] == "llama-adapter-v1"
    assert (doc["adapter"]["adapter_len"], doc["adapter"]["adapter_layer"]) == (6, 2)
    assert "GATE_TANH_MISMATCH" not in ids(doc)  # trained raw: the file says so
