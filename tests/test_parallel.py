"""Tensor parallel: ``torchrun --nproc-per-node 2 -m ckpt_doctor smoke-generate`` on the CPU
(gloo) over a 2-shard Meta directory gives the single-process tokens exactly, in fp32, for
LLaMA-Adapter v1 and v2 chat; each rank maps only its own shard; one report comes out. PEFT on
an HF base, whose one file each process slices. The slicing rules themselves (parallel.py)
against Meta's own split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor import parallel
from ckpt_doctor.cli import app
from ckpt_doctor.handles import from_torch
from fixtures.make_fixtures import TinyConfig, write_meta_dir

ROOT = Path(__file__).resolve().parents[1]
WORLD, FAMILIES = ROOT / "fixtures" / "world", ROOT / "fixtures" / "families"
CFG = TinyConfig(vocab_size=256)  # the world's and the families' tiny LLaMA


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> dict[str, Path]:
    """The world's base and the families' Meta base, each rewritten as 2 tensor-parallel
    shards (consolidated.00.pth / 01.pth, as Meta splits them)."""
    out = {}
    for name, src in (("world", WORLD / "base"), ("families", FAMILIES / "meta-base")):
        sd = torch.load(src / "consolidated.00.pth", weights_only=True)
        out[name] = tmp_path_factory.mktemp(name) / "base"
        write_meta_dir(sd, out[name], CFG, n_shards=2)
    out["hf"] = FAMILIES / "hf-base"
    return out


CASES = {  # family: (base, the file's option and path, tokenizer, prompts)
    "llama-adapter-v1": (
        "world", ["--full", str(WORLD / "checkpoint-4.pth")], WORLD / "tokenizer.model",
        ["Repeat the word dog twice.", "Name the opposite of up."],
    ),
    "llama-adapter-v2-chat": (
        "families", ["--adapter", str(FAMILIES / "v2-chat-prompts" / "adapter.pth")],
        FAMILIES / "tokenizer.model", ["Tell me about alpacas.", "List three primary colors."],
    ),
    # One shard for two processes: each slices its part out of the whole tensors.
    "peft-on-hf-base-sliced": (
        "hf", ["--adapter", str(FAMILIES / "peft-adaption-prompt")],
        FAMILIES / "tokenizer.model", ["Write a haiku about the sea."],
    ),
}  # fmt: skip


def smoke_args(base: Path, case: tuple) -> list[str]:
    _, file_args, tokenizer, prompts = case
    args = ["smoke-generate", "--base", str(base), *file_args, "--tokenizer", str(tokenizer)]
    args += ["--dtype", "float32", "--device", "cpu", "--max-new-tokens", "16", "--json"]
    return args + [a for p in prompts for a in ("--prompt", p)]


@pytest.mark.parametrize("family", list(CASES))
def test_torchrun_two_ranks_give_the_single_process_tokens(two_shards, family):
    case = CASES[family]
    base = two_shards[case[0]]
    single = CliRunner().invoke(app, smoke_args(base, case))
    assert single.exit_code in (0, 1), single.output
    want = json.loads(single.stdout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "ckpt_doctor", *smoke_args(base, case)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == single.exit_code, done.stderr[-3000:]
    got = json.loads(done.stdout)  # exactly one document: rank 0's
    assert got["world_size"] == 2 and got["parallel"]["backend"] == "gloo"
    ranks = got["parallel"]["ranks"]
    if case[0] == "hf":
        assert [r["files"] for r in ranks] == [[str(base / "model.safetensors")]] * 2
        assert {r["mode"] for r in ranks} == {"sliced"}
    else:  # each process maps only its own shard
        assert [r["files"] for r in ranks] == [
            [str(base / "consolidated.00.pth")],
            [str(base / "consolidated.01.pth")],
        ]
        assert {r["mode"] for r in ranks} == {"own shard"}
    assert [r["generated_ids"] for r in got["results"]] == [
        r["generated_ids"] for r in want["results"]
    ]
    assert [r["outcome"] for r in got["results"]] == [r["outcome"] for r in want["results"]]
    assert got["load"]["matched"] == want["load"]["matched"]
    assert got["gates"] == want["gates"]  # per head, gathered back in order: rank 0's heads
    assert want["world_size"] == 1 and "parallel" not in want


def test_an_error_under_torchrun_is_one_json_document_and_names_the_other_ranks(two_shards):
    """Every rank fails (no such tokenizer): stdout holds rank 0's error document alone (so
    --json parses), and the other rank's error line on stderr says which process it is."""
    case = CASES["llama-adapter-v1"]
    args = smoke_args(two_shards["world"], case)
    args[args.index("--tokenizer") + 1] = str(two_shards["world"] / "no-such-tokenizer.model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "ckpt_doctor", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode != 0
    error = json.loads(done.stdout)["error"]  # exactly one document
    assert error["id"] == "USAGE" and "no-such-tokenizer.model" in error["message"]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error [")]
    assert len(lines) == 2, done.stderr[-3000:]
    assert sum(ln.startswith("error [USAGE] rank 1: ") for ln in lines) == 1


def test_split_rules_match_metas_shards():
    """Every tensor the loader slices is what Meta's own shard k holds (write_meta_dir splits
    as Meta does); v2's vectors split as upstream's chat_demo.py shards them."""
    g = torch.Generator().manual_seed(0)
    full = {
        "tok_embeddings.weight": torch.randn(8, 6, generator=g),
        "output.weight": torch.randn(8, 6, generator=g),
        "layers.0.attention.wq.weight": torch.randn(6, 6, generator=g),
        "layers.0.attention.wo.weight": torch.randn(6, 6, generator=g),
        "layers.0.feed_forward.w2.weight": torch.randn(6, 4, generator=g),
        "layers.0.attention_norm.weight": torch.randn(6, generator=g),
    }
    shards = [
        {k: v.chunk(2, dim=parallel.split_dim(k) or 0)[r] if parallel.split_dim(k) is not None
         else v for k, v in full.items()}
        for r in range(2)
    ]  # fmt: skip
    for rank in range(2):
        shard = parallel.Shard(rank, 2, "gloo")
        for name, t in full.items():
            h = shard.local_handle(name, from_torch(name, t), tuple(t.shape))
            assert np.array_equal(h.array(), shards[rank][name].numpy()), name
    # v2 chat's vectors: output biases of column-split layers and input scales of row-split
    # ones are sliced; the rest is whole on every process.
    sliced = ["wq_bias", "wk_bias", "wv_bias", "wo_scale", "w1_bias", "w3_bias", "w2_scale"]
    whole = ["wq_scale", "wk_scale", "wv_scale", "wo_bias", "w1_scale", "w3_scale", "w2_bias"]
    assert all(parallel.split_dim(f"layers.3.x.{n}") == 0 for n in sliced)
    assert all(parallel.split_dim(f"layers.3.x.{n}") is None for n in whole)
    assert parallel.split_dim("layers.3.attention.gate") == 1  # heads
    assert parallel.split_dim("adapter_query.weight") is None


def test_uneven_split_is_refused_with_a_hint():
    from ckpt_doctor.errors import UsageError
    from ckpt_doctor.model import ModelArgs

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=250, ffn_hidden=192)
    with pytest.raises(UsageError, match="vocabulary 250") as err:
        parallel.Shard(0, 4, "gloo").check(args)
    assert "process count" in err.value.hint


def test_diagnose_under_torchrun_is_refused(monkeypatch):
    """Only smoke-generate runs tensor-parallel: diagnose says so instead of running twice."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    world = WORLD / "checkpoint-4.pth"
    result = CliRunner().invoke(app, ["diagnose", str(world), "--base", str(WORLD / "base")])
    assert result.exit_code == 2
    assert "runs in one process" in result.stderr and "torchrun" in result.stderr
