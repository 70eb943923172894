"""The family x command table of the README, cell by cell: every command on every family's file
either works (a JSON report, exit 0 or 1) or refuses with its reason (exit 2, one line) - never
an internal error, never a family run as another.

Files: tests/family_files.py on the fixture world's base (its tokenizer generates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from fixtures.make_fixtures import save_zip
from tests import family_files as ff

CFG = ff.WORLD_CFG
BASE = ff.WORLD / "base"
runner = CliRunner()

COMMANDS = ("inspect", "diff", "extract", "verify", "repair", "convert", "smoke", "diagnose")
WORKS = None  # a cell that works; otherwise the refusal's reason, as a substring
CLIP = "CLIP image features"
QKV = "qkv"
UNKNOWN = "does not know this adapter format"
LITGPT_MODEL = "its own model"

# family -> command -> WORKS or the words of its refusal
TABLE: dict[str, dict[str, str | None]] = {
    "llama-adapter-v1": {**dict.fromkeys(COMMANDS, WORKS)},
    "llama-adapter-v2-chat": {**dict.fromkeys(COMMANDS, WORKS), "convert": "bias"},
    "llama-adapter-v2-multimodal": {
        **dict.fromkeys(COMMANDS, WORKS),
        "convert": CLIP,
        "smoke": CLIP,
        "diagnose": CLIP,
    },
    "peft-adaption-prompt": {**dict.fromkeys(COMMANDS, WORKS)},
    "peft-lora": {**dict.fromkeys(COMMANDS, WORKS), "convert": "changes the weights"},
    "litgpt-adapter-v2": {
        **dict.fromkeys(COMMANDS, WORKS),
        "convert": QKV,
        "smoke": LITGPT_MODEL,
        "diagnose": LITGPT_MODEL,
    },
    "lit-llama-adapter": {
        **dict.fromkeys(COMMANDS, WORKS),
        "smoke": LITGPT_MODEL,
        "diagnose": LITGPT_MODEL,
    },
    "unknown": {**dict.fromkeys(COMMANDS, UNKNOWN), "inspect": WORKS, "diff": WORKS},
}
CONVERT_TO = {"llama-adapter-v1": "peft-adaption-prompt"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (the adapter / training file, the full checkpoint verify compares with)."""
    root = tmp_path_factory.mktemp("matrix")
    base = torch.load(BASE / "consolidated.00.pth", weights_only=True)
    out: dict[str, tuple[Path, Path]] = {}
    # v1 on the last 2 layers, one gate value per layer (so that it converts to PEFT).
    v1 = {"adapter_query.weight": torch.randn(2 * 5, CFG.dim)}
    for i in range(CFG.n_layers):
        value = 0.1 * (i + 1) if i >= CFG.n_layers - 2 else 0.0
        v1[f"layers.{i}.attention.gate"] = torch.full((1, CFG.n_heads, 1, 1), value)
    out["llama-adapter-v1"] = (
        save_zip({"model": {**base, **v1}}, root / "v1.pth"),
        root / "v1.pth",
    )
    chat = ff.v2_chat(CFG, prompt=True)
    chat_ckpt = save_zip(ff.v2_chat_checkpoint(chat), root / "chat-ckpt.pth")
    out["llama-adapter-v2-chat"] = (chat_ckpt, chat_ckpt)
    mm = ff.v2_multimodal(CFG, lora=False)
    mm_ckpt = save_zip(ff.v2_multimodal_training(base, mm), root / "mm-ckpt.pth")
    out["llama-adapter-v2-multimodal"] = (mm_ckpt, mm_ckpt)
    peft = ff.peft_adapter_dir(root / "peft", CFG)
    from fixtures.make_fixtures import hf_state_dict

    meta_named = ff.peft_full_state(hf_state_dict(base, CFG.n_heads), peft)
    out["peft-adaption-prompt"] = (peft, save_zip(meta_named, root / "peft-full.pth"))
    # The world's LoRA: a Trainer checkpoint (the whole PeftModel state dict), its
    # adapter_config.json in the run's folder above.
    lora = ff.WORLD / "lora" / "checkpoint-300" / "pytorch_model.bin"
    out["peft-lora"] = (lora, lora)
    lit_base, lit_adapter = ff.litgpt_v2(CFG)
    lit = save_zip({"model": lit_adapter}, root / "lit_model.pth.adapter_v2")
    out["litgpt-adapter-v2"] = (
        lit,
        save_zip(ff.litgpt_v2_full(lit_base, lit_adapter), root / "lf.pth"),
    )
    lit_llama = {}
    for i in (2, 3):
        lit_llama[f"transformer.h.{i}.attn.adapter_wte.weight"] = torch.randn(6, CFG.dim)
        lit_llama[f"transformer.h.{i}.attn.gating_factor"] = torch.full((1, CFG.n_heads, 1, 1), 0.2)
    ll = save_zip(lit_llama, root / "lit-llama.pth")
    out["lit-llama-adapter"] = (ll, ll)
    # PEFT's IA3 (a learned [out, 1] scale per targeted linear): a format ckpt-doctor does not know.
    unknown = {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.zeros(64, 1)}
    u = save_zip(unknown, root / "unknown.pth")
    out["unknown"] = (u, u)
    return out


def _args(command: str, family: str, path: Path, full: Path, out: Path) -> list[object]:
    prompts = ["--prompt", "Repeat the word dog twice.", "--max-new-tokens", "6"]
    return {
        "inspect": ["inspect", path, "--base", BASE],
        "diff": ["diff", path, "--base", BASE],
        "extract": ["extract", path, "--base", BASE, "-o", out / f"x{_ext(family)}"],
        "verify": ["verify", path, "--base", BASE, "--full", full],
        "repair": ["repair", path, "-o", out / f"r{_ext(family)}"],
        "convert": [
            "convert", path, "--to", CONVERT_TO.get(family, "llama-adapter-v1"),
            "-o", out / f"c{'' if family in CONVERT_TO else '.safetensors'}", "--base", BASE,
        ],
        "smoke": ["smoke-generate", "--base", BASE, "--adapter", path, *prompts],
        "diagnose": ["diagnose", path, "--base", BASE, *prompts],
    }[command]  # fmt: skip


def _ext(family: str) -> str:
    return "" if family in ("peft-adaption-prompt", "peft-lora") else ".pth"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("family", list(TABLE))
def test_family_x_command(tmp_path, files, family, command):
    path, full = files[family]
    if command == "verify" and family != "unknown":
        # verify takes an extracted adapter: extract it first, as a user would.
        adapter = tmp_path / f"adapter{_ext(family)}"
        done = runner.invoke(app, ["extract", str(path), "--base", str(BASE), "-o", str(adapter)])
        assert done.exit_code in (0, 1), done.output
        path = adapter
    result = runner.invoke(
        app, [str(a) for a in _args(command, family, path, full, tmp_path)] + ["--json"]
    )
    doc = json.loads(result.stdout)
    refusal = TABLE[family][command]
    if refusal is WORKS:
        assert result.exit_code in (0, 1), doc
        assert "error" not in doc
        if command == "verify":
            assert doc["passed"], doc["checks"]
    else:
        assert result.exit_code == 2, doc
        assert doc["error"]["id"] != "INTERNAL" and refusal in doc["error"]["message"], doc
        assert len(result.stderr.strip().splitlines()) == 1  # one line with the reason
