"""Adapter families other than LLaMA-Adapter v1 (HF PEFT adaption prompt, litgpt): named,
their prompts and gates read, and never mistaken for a failed v1 load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ckpt_doctor.cli import app

WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"
runner = CliRunner()


def peft_adapter(directory: Path, *, gate: float, layers=(2, 3), drop_gate_of=None) -> Path:
    """What PEFT's save_pretrained writes for an ADAPTION_PROMPT adapter (dim 64, L 10)."""
    directory.mkdir()
    prefix = "base_model.model.model.layers"
    sd = {}
    for i in layers:
        sd[f"{prefix}.{i}.self_attn.adaption_prompt"] = torch.randn(1, 10, 64)
        if i != drop_gate_of:
            sd[f"{prefix}.{i}.self_attn.adaption_gate"] = torch.full((1,), gate)
    save_file(sd, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "ADAPTION_PROMPT", "adapter_len": 10, "adapter_layers": len(layers)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def litgpt_adapter(path: Path, *, gate: float) -> Path:
    sd = {}
    for i in range(4):
        sd[f"transformer.h.{i}.attn.adapter_wte.weight"] = torch.randn(12, 64)
        sd[f"transformer.h.{i}.attn.gating_factor"] = torch.full((1, 1, 4, 1), gate)
    torch.save(sd, path)
    return path


def inspect_json(path: Path) -> tuple[int, dict]:
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize(
    ("make", "family", "length", "layers"),
    [
        (lambda p: peft_adapter(p / "peft", gate=0.2), "peft-adaption-prompt", 10, 2),
        (lambda p: litgpt_adapter(p / "lit.pth", gate=0.3), "litgpt-adapter", 12, 4),
    ],
)
def test_later_families_are_named_and_not_read_as_a_failed_v1_load(
    tmp_path, make, family, length, layers
):
    code, doc = inspect_json(make(tmp_path))
    assert doc["adapter"]["family"] == family
    assert (doc["adapter"]["adapter_len"], doc["adapter"]["adapter_layer"]) == (length, layers)
    assert doc["findings"] == [] and code == 0  # no LOAD_NOTHING, KEY_PREFIX, GATE_SHAPE


def test_zero_gates_and_a_half_saved_layer_are_found_in_peft_adapters(tmp_path):
    code, doc = inspect_json(peft_adapter(tmp_path / "zero", gate=0.0))
    assert code == 1 and [f["id"] for f in doc["findings"]] == ["ADAPTER_INERT"]
    code, doc = inspect_json(peft_adapter(tmp_path / "half", gate=0.5, drop_gate_of=3))
    missing = [f for f in doc["findings"] if f["id"] == "ADAPTER_MISSING"]
    assert code == 1 and missing and missing[0]["evidence"]["layers"] == [3]


def test_smoke_generate_refuses_a_family_the_reference_model_does_not_run(tmp_path):
    """Loading it would match nothing and run the plain base: a usage error says so."""
    adapter = litgpt_adapter(tmp_path / "lit.pth", gate=0.3)
    args = ["smoke-generate", "--base", str(WORLD / "base"), "--adapter", str(adapter)]
    result = runner.invoke(app, [*args, "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert "litgpt-adapter" in result.stderr and "llama-adapter-v1 only" in result.stderr


def test_content_checks_follow_the_family(tmp_path):
    """PEFT gates are raw scalars by design: extract/verify/repair's gate checks do not call
    them GATE_SHAPE or GATE_TANH_MISMATCH (inspect's own rule), only ADAPTER_INERT applies."""
    from ckpt_doctor.checks import content_findings
    from ckpt_doctor.facts import adapter_config, model_facts
    from ckpt_doctor.reader import open_checkpoint

    for gate, expected in ((1.0, []), (0.0, ["ADAPTER_INERT"])):
        adapter = peft_adapter(tmp_path / f"peft{gate}", gate=gate)
        with open_checkpoint(adapter) as ckpt:
            tensors = ckpt.canonical()
            found = content_findings(tensors, model_facts(tensors), adapter_config(tensors))
        assert [f.id for f in found] == expected


@pytest.mark.parametrize("command", ["extract", "repair", "diagnose"])
def test_v1_only_commands_refuse_later_families(tmp_path, command):
    """extract and repair would strip PEFT's own prefix (and leave adapter_config.json
    behind), diagnose would blame a v1 load: all three refuse."""
    adapter = peft_adapter(tmp_path / "peft", gate=0.2)
    args = {
        "extract": ["extract", str(adapter), "-o", str(tmp_path / "out.safetensors")],
        "repair": ["repair", str(adapter), "-o", str(tmp_path / "fixed.safetensors")],
        "diagnose": ["diagnose", str(adapter), "--base", str(WORLD / "base")],
    }[command]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)
    assert "peft-adaption-prompt" in doc["error"]["message"]
    assert "llama-adapter-v1 only" in doc["error"]["message"]
