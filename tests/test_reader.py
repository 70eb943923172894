"""Every reader path gives lazy handles whose values equal what was saved (bit-exact)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_doctor.errors import EmptyFileError, UnreadableError
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    hf_name,
    hf_rotary_order,
    save_hf_sharded,
    save_legacy,
    save_safetensors,
    save_zip,
    training_checkpoint,
    write_meta_dir,
)

CFG = TinyConfig()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return base_state_dict(CFG)


def assert_same(ckpt, expected: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.tensors) == set(expected)
    for name, tensor in expected.items():
        handle = ckpt.tensors[name]
        assert handle.shape == tuple(tensor.shape)
        assert str(handle.dtype) == str(tensor.dtype).removeprefix("torch.")
        assert handle.nbytes == tensor.numel() * tensor.element_size()
        assert torch.equal(handle.to_torch(), tensor), name
        # Row reads and chunk streams must reassemble the same bits.
        if tensor.dim():
            assert np.array_equal(handle.rows(1, 3), tensor[1:3].numpy())
            flat = np.concatenate(list(handle.chunks(max_elems=100)))
            assert np.array_equal(flat, tensor.reshape(-1).numpy())


def test_zip_is_memory_mapped(tmp_path, base):
    path = save_zip(base, tmp_path / "flat.pth")
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch-zip"
        assert ckpt.container_path == () and ckpt.container_subscripts == ""
        assert_same(ckpt, base)
        assert "torch._utils._rebuild_tensor_v2" in ckpt.pickle_globals
        assert not ckpt.notes


def test_unsigned_and_complex128_tensors_read_back(tmp_path):
    """uint16/32/64 and complex128 were an internal KeyError in the torch.load fallback
    (torch itself cannot write the unsigned ones in a legacy pickle)."""
    state = {
        "u16": torch.tensor([1, 2, 65535]).to(torch.uint16),
        "u32": torch.tensor([7, 2**32 - 1]).to(torch.uint32),
        "u64": torch.from_numpy(np.array([5, 2**63], dtype=np.uint64)),
        "c128": torch.tensor([1 + 2j, -3j], dtype=torch.complex128),
        "w": torch.ones(2, 2),
    }
    path = tmp_path / "odd.pth"
    try:
        torch.save(state, path)
    except KeyError:  # torch 2.4 cannot pickle uint16/32/64 storages at all
        pytest.skip(f"torch {torch.__version__} cannot save unsigned tensors")
    with open_checkpoint(path) as ckpt:
        assert {n: h.dtype.name for n, h in ckpt.tensors.items()} == {
            n: str(t.dtype).removeprefix("torch.") for n, t in state.items()
        }
        for name, tensor in state.items():
            assert torch.equal(ckpt.tensors[name].to_torch(), tensor), name


# Both exist from torch 2.7 (e8m0) and 2.2 (fnuz); an older torch cannot save them either.
@pytest.mark.parametrize("name", ["float8_e8m0fnu", "float8_e5m2fnuz"])
def test_a_dtype_it_cannot_read_is_unreadable_naming_the_tensor(tmp_path, name):
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no {name}")
    path = tmp_path / "exotic.pth"
    torch.save({"model": {"w": torch.zeros(3).to(dtype), "ok": torch.ones(2)}}, path)
    with pytest.raises(UnreadableError) as info:
        open_checkpoint(path)
    assert str(path) in info.value.message
    assert "model.w" in info.value.message and name in info.value.message
    assert info.value.hint


def test_one_text_for_a_container_path_everywhere(tmp_path, base):
    """inspect, its findings, repair and diagnose all print checkpoint['a']['b'] the same way."""
    from ckpt_doctor.containers import subscripts
    from ckpt_doctor.families import LLAMA_ADAPTER_V1
    from ckpt_doctor.inspection import inspect_checkpoint
    from ckpt_doctor.load_checks import check_container
    from ckpt_doctor.repair import plan_repair

    assert subscripts(("state_dict", "module")) == "['state_dict']['module']"
    path = save_zip({"state_dict": {"module": adapter_tensors(CFG)}}, tmp_path / "deep.pth")
    with open_checkpoint(path) as ckpt:
        where = ckpt.container_subscripts
        assert where == subscripts(ckpt.container_path) and where.startswith("['state_dict']")
        assert inspect_checkpoint(ckpt).container_subscripts == where
        (nested,) = check_container(ckpt, LLAMA_ADAPTER_V1)
        assert f"checkpoint{where}" in nested.message
        _, changes = plan_repair(ckpt, family=LLAMA_ADAPTER_V1)
        assert f"checkpoint{where}" in changes[0].detail


def test_legacy_pickle_warns_about_ram(tmp_path, base):
    path = save_legacy(base, tmp_path / "legacy.pth")
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch-legacy"
        assert_same(ckpt, base)
        assert any("RAM" in n for n in ckpt.notes)


def test_safetensors_single_keeps_metadata(tmp_path, base):
    path = save_safetensors(base, tmp_path / "m.safetensors", metadata={"family": "x"})
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "safetensors"
        assert ckpt.metadata == {"family": "x"}
        assert_same(ckpt, base)


def test_hf_sharded_dir(tmp_path, base):
    save_hf_sharded(base, tmp_path / "hf", n_shards=2)
    with open_checkpoint(tmp_path / "hf") as ckpt:
        assert ckpt.format == "hf-sharded"
        assert len(ckpt.files) == 2
        assert_same(ckpt, base)


def test_hf_sharded_missing_shard_names_it(tmp_path, base):
    index = save_hf_sharded(base, tmp_path / "hf", n_shards=2)
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[1]
    (tmp_path / "hf" / shard).unlink()
    with pytest.raises(UnreadableError, match=shard):
        open_checkpoint(tmp_path / "hf")


def test_meta_dir_two_shards_merge_lazily(tmp_path, base):
    write_meta_dir(base, tmp_path / "meta", CFG, n_shards=2)
    (tmp_path / "tokenizer.model").write_bytes(b"stub")
    with open_checkpoint(tmp_path / "meta") as ckpt:
        assert ckpt.format == "meta-dir"
        assert len(ckpt.files) == 2
        assert ckpt.params["dim"] == CFG.dim
        assert ckpt.tokenizer_path == tmp_path / "tokenizer.model"
        assert any("2 tensor-parallel shards" in n for n in ckpt.notes)
        assert_same(ckpt, base)


def test_meta_dir_shards_must_agree(tmp_path, base):
    write_meta_dir(base, tmp_path / "meta", CFG, n_shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    shard.pop("norm.weight")
    torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(UnreadableError, match="different tensor names"):
        open_checkpoint(tmp_path / "meta")


@pytest.mark.parametrize("params", [True, False])
def test_meta_dir_with_a_shard_missing_is_unreadable(tmp_path, base, params):
    """Half the columns of every split tensor would read as a smaller model: refused, whether
    params.json or the replicated norm says how wide the model is."""
    write_meta_dir(base, tmp_path / "meta", CFG, n_shards=2)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    if not params:
        (tmp_path / "meta" / "params.json").unlink()
    with pytest.raises(UnreadableError, match="shards are missing") as info:
        open_checkpoint(tmp_path / "meta")
    assert f"{CFG.dim} wide" in info.value.message and "consolidated.NN.pth" in info.value.hint


def test_nested_training_checkpoint(tmp_path, base):
    adapter = adapter_tensors(CFG)
    path = save_zip(training_checkpoint(CFG, base, adapter), tmp_path / "checkpoint-4.pth")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container_path == ("model",) and ckpt.container_subscripts == "['model']"
        assert ckpt.top_level_keys == ["model", "optimizer", "epoch", "scaler", "args"]
        assert_same(ckpt, {**base, **adapter})
        assert ckpt.args["adapter_len"] == CFG.adapter_len
        assert ckpt.args["adapter_layer"] == CFG.adapter_layer
        kinds = {k: e.kind for k, e in ckpt.entries.items()}
        assert kinds == {
            "optimizer": "optimizer",
            "epoch": "value",
            "scaler": "dict",
            "args": "args",
        }
        assert ckpt.entries["optimizer"].tensor_bytes > 0
        assert "argparse.Namespace" in ckpt.pickle_globals


@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod.", "base_model.model."])
def test_prefixed_keys_resolve(tmp_path, base, prefix):
    path = save_zip({prefix + k: v for k, v in base.items()}, tmp_path / "p.pth")
    with open_checkpoint(path) as ckpt:
        assert "".join(ckpt.prefix.wrappers) + "".join(ckpt.prefix.namespace) == prefix
        canonical = ckpt.canonical()
        assert set(canonical) == set(base)
        assert torch.equal(canonical["norm.weight"].to_torch(), base["norm.weight"])


def test_hf_names_map_to_meta(tmp_path, base):
    hf = {
        "model.embed_tokens.weight": base["tok_embeddings.weight"],
        "model.layers.0.self_attn.q_proj.weight": base["layers.0.attention.wq.weight"],
        "model.layers.0.mlp.down_proj.weight": base["layers.0.feed_forward.w2.weight"],
        "lm_head.weight": base["output.weight"],
    }
    path = save_safetensors(hf, tmp_path / "model.safetensors")
    with open_checkpoint(path) as ckpt:
        assert set(ckpt.canonical()) == {
            "tok_embeddings.weight",
            "layers.0.attention.wq.weight",
            "layers.0.feed_forward.w2.weight",
            "output.weight",
        }


def test_unreadable_inputs(tmp_path, base):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(EmptyFileError) as info:
        open_checkpoint(tmp_path / "empty.pth")
    assert info.value.code == "EMPTY"
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(UnreadableError, match="not a checkpoint"):
        open_checkpoint(tmp_path / "junk.bin")
    data = save_zip(base, tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableError):
        open_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(UnreadableError, match="no such file"):
        open_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UnreadableError, match="no checkpoint files"):
        open_checkpoint(tmp_path / "dir")


def test_zip_reader_handles_dtypes_views_shared_storage_and_parameters(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, generator=g)
    shared = torch.arange(10, dtype=torch.int64)
    obj = {
        "bf16": w.bfloat16(),
        "transposed": w.t(),  # a saved non-contiguous view
        "offset_view": shared[3:7],  # shares storage with "shared", storage offset 3
        "shared": shared,
        "param": torch.nn.Parameter(w.half()),
        "mask": w > 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "mixed.pth"
    torch.save(obj, path)
    with open_checkpoint(path) as ckpt:
        assert not ckpt.notes  # read by the zip reader, not the torch.load fallback
        for name, tensor in obj.items():
            handle = ckpt.tensors[name]
            assert handle.shape == tuple(tensor.shape), name
            assert torch.equal(handle.to_torch(), tensor.detach()), name
        assert np.array_equal(
            ckpt.tensors["bf16"].values(), obj["bf16"].double().numpy()
        )  # bfloat16 decoded without torch


def test_zip_and_safetensors_reads_do_not_import_torch(tmp_path, base):
    """inspect must stay seconds-long: importing torch alone costs seconds."""
    zip_path = save_zip(training_checkpoint(CFG, base, adapter_tensors(CFG)), tmp_path / "c.pth")
    st_path = save_safetensors(base, tmp_path / "m.safetensors")
    code = (
        "import sys\n"
        "from ckpt_doctor.reader import open_checkpoint\n"
        "from ckpt_doctor.inspection import inspect_checkpoint\n"
        f"inspect_checkpoint(open_checkpoint({str(zip_path)!r}),"
        f" base=open_checkpoint({str(st_path)!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_hf_sharded_pickle_dir(tmp_path, base):
    names = sorted(base)
    half = len(names) // 2
    groups = {"pytorch_model-00001-of-00002.bin": names[:half]}
    groups["pytorch_model-00002-of-00002.bin"] = names[half:]
    folder = tmp_path / "hfbin"
    folder.mkdir()
    for file, group in groups.items():
        save_zip({n: base[n] for n in group}, folder / file)
    weight_map = {n: f for f, group in groups.items() for n in group}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(folder) as ckpt:
        assert ckpt.format == "hf-sharded" and len(ckpt.files) == 2
        assert_same(ckpt, base)


def test_hf_rotary_row_order_is_undone(tmp_path):
    """An HF-layout copy of the world base (HF names, q/k rows in HF's rotary order,
    config.json) reads back as the Meta base, bit for bit: the same model, not a silently
    different one. Without config.json a head count that cannot be inferred is an error when
    the values are read, not a wrong answer."""
    world = Path(__file__).resolve().parents[1] / "fixtures" / "world" / "base"
    meta = torch.load(world / "consolidated.00.pth", weights_only=True)
    params = json.loads((world / "params.json").read_text())
    heads = params["n_heads"]
    hf = {}
    for name, value in meta.items():
        if name.split(".")[-2] in ("wq", "wk"):
            value = hf_rotary_order(value, heads)
        hf[hf_name(name)] = value.contiguous()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_safetensors(hf, hf_dir / "model.safetensors")
    config = {"hidden_size": params["dim"], "num_attention_heads": heads}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with open_checkpoint(hf_dir) as ckpt:
        canonical = ckpt.canonical()
        assert set(canonical) == set(meta)
        for name, value in meta.items():
            assert torch.equal(canonical[name].to_torch(), value), name
    from ckpt_doctor.inspection import inspect_checkpoint

    with open_checkpoint(hf_dir) as ckpt:  # an HF base is a base: from_pretrained loads it
        assert not [f for f in inspect_checkpoint(ckpt).findings if f.id == "LOAD_NOTHING"]
    (hf_dir / "config.json").unlink()
    with open_checkpoint(hf_dir) as ckpt:
        wq = ckpt.canonical()["layers.0.attention.wq.weight"]
        assert wq.shape == tuple(meta["layers.0.attention.wq.weight"].shape)  # names, shapes
        with pytest.raises(UnreadableError, match="head count is unknown"):
            wq.to_torch()
