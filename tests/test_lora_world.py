"""The world's LoRA scene (fixtures/world/lora/) is what fixtures/lora_world.py builds: the
first training steps reproduce, a short build is identical twice, the committed files match
the manifest, and the manifest records the story (the empty adapter loops on every held-out
prompt, the LoRA extracted from the checkpoint ends in eos on every one)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("sentencepiece")

from fixtures import lora_world, world

SCENE = lora_world.DEFAULT_OUT
MANIFEST = json.loads((SCENE / "manifest.json").read_text())
CFG = lora_world.LoraConfig()


def test_config_is_the_default():
    assert MANIFEST["config"] == {k: getattr(CFG, k) for k in MANIFEST["config"]}


def test_committed_files_match_the_manifest():
    for name, digest in MANIFEST["sha256"].items():
        assert hashlib.sha256((SCENE / name).read_bytes()).hexdigest() == digest, name


def test_the_adapter_file_is_the_save_bugs_empty_dict():
    assert torch.load(SCENE / "adapter_model.bin", weights_only=True) == {}
    config = json.loads((SCENE / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == sorted(lora_world.TARGETS)


def test_the_checkpoint_is_a_peft_model_state_dict():
    sd = torch.load(SCENE / f"checkpoint-{CFG.steps}" / "pytorch_model.bin", weights_only=True)
    stem = "base_model.model.model.layers.0.self_attn"
    assert sd[f"{stem}.q_proj.base_layer.weight"].dtype == torch.float16
    assert sd[f"{stem}.q_proj.lora_A.default.weight"].shape == (CFG.r, 64)
    assert sd[f"{stem}.q_proj.lora_B.default.weight"].dtype == torch.float32
    assert f"{stem}.q_proj.weight" not in sd and len(sd) == 3 + 9 * 4 + 2 * 4 * 4


def test_the_manifest_records_the_story():
    outcomes = MANIFEST["validation"]["outcomes"]
    n = MANIFEST["validation"]["held_out"]
    empty = outcomes["adapter_model.bin as PEFT loads it"]
    cured = outcomes["extracted from the checkpoint (strict)"]
    assert empty["loop"] == n and empty["lora_tensors"] == 0
    assert cured["eos"] == n and cured["correct"] >= n - 2 and cured["lora_tensors"] == 32


def test_first_steps_reproduce():
    with world.reproducible():
        ds = world.build_dataset(world.WorldConfig().seed)
        sp = world.load_sp((world.DEFAULT_OUT / "tokenizer.model").read_bytes())
        model = lora_world.base_model()
        deltas = lora_world.attach(model, CFG)
        losses = lora_world.train(model, deltas, sp, ds, CFG, steps=3, log=lambda _: None)
    assert losses == pytest.approx(MANIFEST["training"]["first_losses"], rel=1e-4)


def test_a_short_build_is_identical_twice(tmp_path):
    cfg = replace(CFG, steps=3)
    first = lora_world.build(tmp_path / "a", cfg, log=lambda _: None, validate=False)
    second = lora_world.build(tmp_path / "b", cfg, log=lambda _: None, validate=False)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(tmp_path / "a") == files(tmp_path / "b") and first == second
