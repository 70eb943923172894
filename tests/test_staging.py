"""staging.DeviceCopier: weights cross to the device in bounded chunks, byte for byte, casts
on the far side. On the CPU the same chunk logic runs without pinning or a stream; CUDA's
pinned buffers and copy stream run in benchmarks/run_gpu.sh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt_doctor import loading, staging
from ckpt_doctor.generate import GenerationConfig
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.smoke import smoke_generate

WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])
def test_chunked_copies_are_byte_exact_for_every_dtype(chunk):
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(37, 11, generator=g).half(),
        torch.randn(5, 3, 2, generator=g).bfloat16(),
        torch.randn(1001, generator=g),
        torch.randint(-5, 5, (13,), generator=g),
        torch.tensor(3.5),  # 0-d
        torch.empty(0, 4),
        torch.randn(8, 4, generator=g).t(),  # not contiguous
    ]
    copier = staging.DeviceCopier(torch.device("cpu"), chunk_bytes=chunk)
    for t in tensors:
        out = copier.to_device(t, [t.dtype])
        assert out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(out, t)
        assert t.numel() == 0 or out.data_ptr() != t.data_ptr()  # a copy, not a view
    half = copier.to_device(tensors[0], [torch.float32])  # cast after the copy
    assert half.dtype == torch.float32 and torch.equal(half, tensors[0].float())
    rounded = copier.to_device(tensors[2], [torch.bfloat16, torch.float32])  # through bf16
    assert torch.equal(rounded, tensors[2].bfloat16().float())
    copier.finish()


def test_a_staged_load_gives_the_same_model_and_tokens(monkeypatch, one_thread):
    """The whole load through the copier (as on CUDA, in 4 KiB chunks): every parameter and
    the generated tokens equal the direct load's."""
    config = GenerationConfig(max_new_tokens=8)
    prompt = ["Repeat the word dog twice."]
    with open_checkpoint(WORLD / "base") as base, open_checkpoint(WORLD / "checkpoint-4.pth") as c:
        direct, _ = loading.load_model(base, full=c, max_seq_len=64)
        want = smoke_generate(base, full=c, prompts=prompt, config=config)
        monkeypatch.setattr(loading, "STAGED", ("cuda", "cpu"))
        monkeypatch.setattr(staging, "CHUNK_BYTES", 4096)
        staged, _ = loading.load_model(base, full=c, max_seq_len=64)
        assert staged.base_info.copier is not None
        got = smoke_generate(base, full=c, prompts=prompt, config=config)
    a, b = direct.state_dict(), staged.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.generated_ids for r in got.results] == [r.generated_ids for r in want.results]
