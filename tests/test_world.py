"""The committed fixture world (fixtures/world/) is what fixtures/world.py generates.

Only the cheap parts are rerun here (dataset, tokenizer, the first training steps); the
behaviour of the trained models (eos vs loop) is checked through the CLI elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import replace

import pytest
import torch

spm = pytest.importorskip("sentencepiece")

from fixtures import world  # noqa: E402  (imports sentencepiece)
from fixtures.world import DEFAULT_OUT as WORLD  # noqa: E402
from fixtures.world import WorldConfig  # noqa: E402
from tests.trusted_load import load_training_checkpoint  # noqa: E402

MANIFEST = json.loads((WORLD / "manifest.json").read_text())
CFG = WorldConfig(**MANIFEST["config"])


@pytest.fixture(scope="module")
def ds():
    return world.build_dataset(CFG.seed)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(WORLD / "tokenizer.model"))


@pytest.fixture(scope="module")
def checkpoint():
    return load_training_checkpoint(WORLD / "checkpoint-4.pth")


def test_config_is_the_default():
    assert WorldConfig() == CFG, "fixtures/world/ was generated with another WorldConfig"


def test_dataset_reproduces(ds):
    assert world.corpus_sha256(ds) == MANIFEST["dataset"]["corpus_sha256"]
    assert len(ds.train) == MANIFEST["dataset"]["train"]
    prompts = json.loads((WORLD / "prompts.json").read_text())
    assert prompts == {
        "held_out": [ex.instruction for ex in ds.held_out],
        "answers": [ex.response for ex in ds.held_out],
        "template": "alpaca",
    }
    assert len(prompts["held_out"]) == MANIFEST["dataset"]["held_out"] >= 40


def test_held_out_is_unseen(ds):
    train = {ex.instruction for ex in ds.train}
    assert not train & {ex.instruction for ex in ds.held_out}
    assert len(set(prompts := [ex.instruction for ex in ds.held_out])) == len(prompts)

    # every held-out reversal uses a set of words no training reversal uses
    def words(ex):
        return frozenset(ex.instruction.split(": ")[1].split())

    triples = {words(ex) for ex in ds.train if ex.task == "reverse"}
    assert not triples & {words(ex) for ex in ds.held_out if ex.task == "reverse"}
    assert {ex.task for ex in ds.held_out} == {ex.task for ex in ds.train}


def test_tokenizer_reproduces(ds, sp):
    fresh = world.load_sp(world.train_tokenizer(ds, CFG))
    assert fresh.get_piece_size() == sp.get_piece_size() == MANIFEST["tokenizer"]["pieces"]
    for i in range(sp.get_piece_size()):
        assert fresh.id_to_piece(i) == sp.id_to_piece(i), i
        assert fresh.get_score(i) == sp.get_score(i), i
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)


def test_prompt_ids_follow_spec(ds, sp):
    from ckpt_doctor.tokenizer import format_prompt

    ex = ds.held_out[0]
    prompt, response = world.encode(sp, ex)
    assert prompt == [1, *sp.encode(format_prompt(ex.instruction))]
    assert sp.eos_id() not in prompt + response
    assert sp.decode(response) == ex.response
    assert sp.unk_id() not in {i for e in ds.held_out for i in world.encode(sp, e)[0]}


def test_base_text_never_ends_a_response_with_eos(ds, sp):
    """Alpaca rows repeat the response to the end; eos only closes the pretraining documents."""
    rows = world.base_batch(sp, ds.train, random.Random(0), 64, CFG.base_seq_len).tolist()
    response = sp.piece_to_id("▁Response")
    alpaca = [row for row in rows if response in row]
    assert 16 < len(alpaca) < 64
    assert all(sp.eos_id() not in row for row in alpaca)
    assert all(sp.eos_id() in row for row in rows if response not in row)


def test_first_base_steps_reproduce(ds, sp, one_thread):
    _, losses = world.train_base(CFG, sp, ds, steps=3, log=lambda _: None)
    assert losses == pytest.approx(MANIFEST["training"]["base_first_losses"], rel=1e-4)


def test_first_adapter_steps_reproduce(ds, sp, one_thread):
    """From the committed (fp16) base: the adapter's first steps give the recorded losses."""
    model = world.init_model(CFG, sp.get_piece_size())
    base = torch.load(WORLD / "base" / "consolidated.00.pth", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in base.items()}, strict=False)
    _, losses = world.train_adapter(CFG, model, sp, ds, steps=3, log=lambda _: None)
    assert losses == pytest.approx(MANIFEST["training"]["adapter_first_losses"], rel=1e-4)


def test_base_dir_layout(sp):
    params = json.loads((WORLD / "base" / "params.json").read_text())
    assert params == {
        "dim": CFG.dim,
        "multiple_of": CFG.multiple_of,
        "n_heads": CFG.n_heads,
        "n_layers": CFG.n_layers,
        "norm_eps": CFG.norm_eps,
        "vocab_size": sp.get_piece_size(),
    }
    base = torch.load(WORLD / "base" / "consolidated.00.pth", weights_only=True)
    assert base["tok_embeddings.weight"].shape == (sp.get_piece_size(), CFG.dim)
    assert all(v.dtype == torch.float16 for v in base.values())
    assert not any(k.startswith("adapter") or k.endswith(".gate") for k in base)
    assert len(base) == 3 + 9 * CFG.n_layers


def test_checkpoint_layout(checkpoint):
    base = torch.load(WORLD / "base" / "consolidated.00.pth", weights_only=True)
    model = checkpoint["model"]
    gates = [f"layers.{i}.attention.gate" for i in range(CFG.n_layers)]
    assert set(model) == {*base, "adapter_query.weight", *gates}
    for name, t in base.items():  # the very base tensors, bit for bit
        assert model[name].dtype == torch.float16
        assert torch.equal(model[name].view(torch.int16), t.view(torch.int16)), name
    query = model["adapter_query.weight"]
    assert query.dtype == torch.float32
    assert query.shape == (CFG.adapter_layer * CFG.adapter_len, CFG.dim)
    adapted = range(CFG.n_layers - CFG.adapter_layer, CFG.n_layers)
    for i, name in enumerate(gates):
        g = model[name]
        assert g.dtype == torch.float32 and g.shape == (1, CFG.n_heads, 1, 1)
        if i in adapted:
            assert bool((g != 0).all()), name
            assert g.flatten().tolist() == pytest.approx(MANIFEST["gates"][str(i)])
        else:
            assert bool((g == 0).all()), name


def test_checkpoint_training_state(checkpoint):
    assert checkpoint["epoch"] == 4
    assert checkpoint["scaler"] == {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    args = checkpoint["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.adapter_len, args.adapter_layer) == (CFG.adapter_len, CFG.adapter_layer)
    assert (args.max_seq_len, args.batch_size) == (CFG.max_seq_len, CFG.adapter_batch)
    assert (args.epochs, args.model, args.lr) == (5, "llama7B_adapter", CFG.adapter_lr)
    opt = checkpoint["optimizer"]
    adapted = range(CFG.n_layers - CFG.adapter_layer, CFG.n_layers)
    trained = [checkpoint["model"]["adapter_query.weight"]]
    trained += [checkpoint["model"][f"layers.{i}.attention.gate"] for i in adapted]
    assert sorted(opt["state"]) == list(range(len(trained)))
    for idx, p in enumerate(trained):
        state = opt["state"][idx]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
        assert float(state["step"]) == CFG.adapter_steps
    assert [g["params"] for g in opt["param_groups"]] == [
        [0],
        list(range(1, 1 + CFG.adapter_layer)),
    ]


def test_manifest_records_the_outcomes():
    n = MANIFEST["dataset"]["held_out"]
    assert MANIFEST["validation"]["max_new_tokens"] == 128
    table = MANIFEST["validation"]["outcomes"]
    assert set(table) == set(world.RUNS)
    for counts in table.values():
        assert counts["eos"] + counts["loop"] + counts["max_tokens"] == n
    assert table["base+adapter (strict)"]["eos"] >= 0.9 * n
    assert table["base alone"]["eos"] <= 0.1 * n
    assert table["upstream load (strict=False)"] == table["base alone"]
    assert table["upstream load (strict=False)"]["matched_keys"] == 0
    assert MANIFEST["max_abs_gate"] < 0.6


def test_manifest_records_the_accuracy_and_every_wrong_answer(ds):
    acc = MANIFEST["accuracy"]
    n = MANIFEST["dataset"]["held_out"]
    assert acc["prompts"] == n == 46
    assert acc["correct"] == MANIFEST["validation"]["outcomes"][world.ADAPTED_RUN]["correct"]
    assert acc["correct"] == n - len(acc["wrong"]) >= 0.9 * n
    assert sum(t["prompts"] for t in acc["per_task"].values()) == n
    assert sum(t["correct"] for t in acc["per_task"].values()) == acc["correct"]
    expected = {ex.instruction: ex.response for ex in ds.held_out}
    for w in acc["wrong"]:
        assert w["expected"] == expected[w["prompt"]] and w["got"].strip() != w["expected"]
    # the demo shows the first four held-out prompts: all of them answered right
    shown = [ex.instruction for ex in ds.held_out[:4]]
    assert not {w["prompt"] for w in acc["wrong"]} & set(shown)


def test_committed_files_match_the_manifest():
    for name, digest in MANIFEST["sha256"].items():
        assert hashlib.sha256((WORLD / name).read_bytes()).hexdigest() == digest, name


def test_a_short_build_is_identical_twice(tmp_path):
    """The world is a function of its config: two builds (a few training steps each) write
    the same bytes, whatever thread count the caller had set."""
    cfg = replace(CFG, base_steps=4, adapter_steps=3, max_new_tokens=8)
    before = torch.get_num_threads()
    try:
        first = world.build_world(tmp_path / "a", cfg, log=lambda _: None)
        torch.set_num_threads(2)
        second = world.build_world(tmp_path / "b", cfg, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert set(a) == {"tokenizer.model", "prompts.json", "manifest.json", "checkpoint-4.pth",
                      "base/consolidated.00.pth", "base/params.json"}  # fmt: skip
    assert a == b
    assert (
        first == second
        and first["sha256"]["checkpoint-4.pth"] == hashlib.sha256(a["checkpoint-4.pth"]).hexdigest()
    )
