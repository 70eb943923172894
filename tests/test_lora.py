"""PEFT LoRA: extraction from full PeftModel state dicts of both naming generations (bit for bit
PEFT's adapter), verify, the merge, and the refusals. Findings are in test_lora_findings.py,
parity with PEFT's own generate in test_family_parity.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_doctor import keys
from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.extraction import extract
from ckpt_doctor.loading import load_model
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.verification import verify
from fixtures.families.lora_format import lora_adapter, lora_full
from fixtures.make_family_fixtures import hf_permute, meta_base, meta_to_hf
from fixtures.make_fixtures import save_safetensors, save_zip

FAMILIES = Path(__file__).resolve().parents[1] / "fixtures" / "families"
LORA = FAMILIES / "peft-lora"
HF_BASE = FAMILIES / "hf-base"


P = "base_model.model.model.layers.1."
NAMES = {  # saved name -> canonical name, every PEFT generation
    P + "self_attn.q_proj.lora_A.weight": "layers.1.attention.wq.lora_A.weight",
    P + "self_attn.q_proj.lora_A.default.weight": "layers.1.attention.wq.lora_A.weight",
    P + "mlp.down_proj.lora_B.default.weight": "layers.1.feed_forward.w2.lora_B.weight",
    P + "self_attn.q_proj.base_layer.weight": "layers.1.attention.wq.weight",
    P + "self_attn.q_proj.weight": "layers.1.attention.wq.weight",
    "module.base_model.model.lm_head.lora_B.weight": "output.lora_B.weight",
}


@pytest.mark.parametrize(("saved", "canonical"), NAMES.items())
def test_names_of_every_peft_generation_are_one_canonical_name(saved, canonical):
    assert keys.canonical_name(saved) == canonical


def _run(root: Path, *, base_layer: bool, fmt: str) -> Path:
    """A Trainer run's output_dir: adapter_config.json on top, the whole PeftModel state dict
    in checkpoint-10/ (as a .bin, a .safetensors or an HF sharded dir)."""
    run = root / f"run-{base_layer}-{fmt}"
    step = run / "checkpoint-10"
    step.mkdir(parents=True)
    shutil.copy(LORA / "adapter_config.json", run / "adapter_config.json")
    full = lora_full(meta_to_hf(meta_base()), lora_adapter(), base_layer=base_layer)
    if fmt == "bin":
        return save_zip(full, step / "pytorch_model.bin")
    if fmt == "safetensors":
        return save_safetensors(full, step / "model.safetensors", metadata={"format": "pt"})
    names = list(full)
    halves = {
        "model-00001-of-00002.safetensors": names[:40],
        "model-00002-of-00002.safetensors": names[40:],
    }
    for file, part in halves.items():
        save_safetensors({k: full[k] for k in part}, step / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}
    (step / "model.safetensors.index.json").write_text(json.dumps(index))
    return step


@pytest.mark.parametrize("base_layer", [True, False], ids=["peft>=0.7", "peft<0.7"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors", "sharded"])
@pytest.mark.parametrize("with_base", [True, False], ids=["--base", "no-base"])
def test_extract_gives_pefts_tensors_bit_for_bit(tmp_path, base_layer, fmt, with_base):
    source = _run(tmp_path, base_layer=base_layer, fmt=fmt)
    out = tmp_path / "adapter"
    with open_checkpoint(source) as ckpt, open_checkpoint(HF_BASE) as base:
        result = extract(ckpt, out, base=base if with_base else None)
    assert not result.findings
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(LORA / "adapter_model.safetensors"))
    assert set(got) == set(want)  # exactly PEFT's names: no adapter name, no base_layer
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((LORA / "adapter_config.json").read_text())
    assert config == original | {"inference_mode": True}


def test_verify_proves_the_extracted_lora(tmp_path):
    source = _run(tmp_path, base_layer=True, fmt="bin")
    with open_checkpoint(source) as ckpt, open_checkpoint(HF_BASE) as base:
        extract(ckpt, tmp_path / "adapter", base=base)
    with (
        open_checkpoint(tmp_path / "adapter") as adapter,
        open_checkpoint(HF_BASE) as base,
        open_checkpoint(source) as ckpt,
    ):
        report = verify(adapter, base=base, full=ckpt)
    assert report.verdict == "verified", report.checks
    checks = {c.name: c.detail for c in report.checks}
    assert "56 of its 56" in checks["upstream load"]
    assert checks["same logits"] == "base + adapter == full checkpoint, bit for bit"
    # A bare state dict without any adapter_config.json takes the adapter's config.
    bare = save_zip(torch.load(source, weights_only=True), tmp_path / "bare" / "sd.pth")
    with (
        open_checkpoint(tmp_path / "adapter") as adapter,
        open_checkpoint(HF_BASE) as base,
        open_checkpoint(bare) as ckpt,
    ):
        assert verify(adapter, base=base, full=ckpt).passed


def test_the_merge_is_pefts_scale_times_b_at_a_and_leaves_the_file_alone():
    """W' = W + scale * B @ A with scale lora_alpha / r per module (rank_pattern: o_proj r 4,
    alpha_pattern: down_proj alpha 8), B's q/k rows un-permuted like the weight's; the base's
    file map is never written."""
    before = (FAMILIES / "meta-base" / "consolidated.00.pth").read_bytes()
    with open_checkpoint(FAMILIES / "meta-base") as base:
        model, report = load_model(base, adapter=open_checkpoint(LORA), dtype="float32")
    assert (FAMILIES / "meta-base" / "consolidated.00.pth").read_bytes() == before
    meta, lora = meta_base(), lora_adapter()
    stem = "base_model.model.model.layers.1."
    cases = {  # model weight, HF module, scale
        ("attention", "wq"): ("self_attn.q_proj", 16 / 8),
        ("attention", "wo"): ("self_attn.o_proj", 16 / 4),
        ("feed_forward", "w2"): ("mlp.down_proj", 8 / 8),
    }
    for (block, w), (hf, scale) in cases.items():
        a, b = lora[f"{stem}{hf}.lora_A.weight"], lora[f"{stem}{hf}.lora_B.weight"]
        if w == "wq":  # B's rows in HF's order: back to Meta's
            n = 4
            b = b.view(n, 2, b.shape[0] // n // 2, -1).transpose(1, 2).reshape(b.shape)
            assert torch.equal(hf_permute(b, n), lora[f"{stem}{hf}.lora_B.weight"])
        want = meta[f"layers.1.{block}.{w}.weight"].float() + scale * (b @ a)
        got = getattr(getattr(model.layers[1], block), w).weight
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert len(report.from_file) == 56


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"r": 16}, "rank 16"),
    ],
)
def test_what_is_not_plain_lora_is_refused_with_the_reason(tmp_path, change, words):
    adapter = tmp_path / "adapter"
    shutil.copytree(LORA, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text()) | change
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with open_checkpoint(FAMILIES / "hf-base") as base, pytest.raises(CkptDoctorError) as exc:
        load_model(base, adapter=open_checkpoint(adapter))
    assert words in exc.value.message


def test_a_lora_without_its_config_is_refused_not_guessed(tmp_path):
    """lora_alpha is nowhere in the tensors: extract and the model refuse rather than guess."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(LORA / "adapter_model.safetensors", bare)
    with open_checkpoint(HF_BASE) as base, pytest.raises(CkptDoctorError) as exc:
        load_model(base, adapter=open_checkpoint(bare))
    assert "lora_alpha" in exc.value.message
    with open_checkpoint(bare) as ckpt, pytest.raises(CkptDoctorError) as exc:
        extract(ckpt, tmp_path / "out")
    assert "lora_alpha" in exc.value.message and not (tmp_path / "out").exists()
