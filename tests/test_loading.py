"""load_model: strict vs upstream loading of every fixture variant, dtypes, and file sharing.

Variants (all built in a temporary directory from fixtures/make_fixtures.py, fp16 Meta base):
(a) flat extracted adapter, (b) upstream training checkpoint (nested under 'model'),
(c) ``module.``-prefixed flat adapter, (d) legacy scalar gates, (e) adapter without its gates,
(f) full checkpoint missing a base tensor, (g) adapter_query of the wrong width.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from pathlib import Path

import pytest
import torch

from ckpt_doctor.errors import ModelLoadError, UsageError
from ckpt_doctor.loading import load_model
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    extracted_adapter,
    save_zip,
    training_checkpoint,
    write_meta_dir,
)

CFG = TinyConfig()
DROPPED = "layers.1.feed_forward.w2.weight"  # the base tensor variant (f) lacks
GATES = [f"layers.{i}.attention.gate" for i in range(CFG.n_layers)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def v(tmp_path_factory) -> dict[str, Path | dict]:
    root = tmp_path_factory.mktemp("loading")
    base = base_state_dict(CFG)  # fp16, as Meta ships
    adapter = adapter_tensors(CFG)
    flat = extracted_adapter(CFG, adapter)
    scalar = extracted_adapter(CFG, adapter_tensors(CFG, scalar_gates=True))
    # The per-head adapter that (d) means: each scalar broadcast to every head.
    broadcast = {
        k: t.reshape(1, 1, 1, 1).expand(1, CFG.n_heads, 1, 1).clone() if k in GATES else t
        for k, t in scalar.items()
    }
    no_gates_ckpt = training_checkpoint(CFG, base, adapter)
    for name in GATES:
        del no_gates_ckpt["model"][name]
    missing_base = training_checkpoint(CFG, base, adapter)
    del missing_base["model"][DROPPED]
    narrow = {**flat, "adapter_query.weight": torch.randn(8, CFG.dim // 2)}
    inert = {k: torch.zeros_like(t) if k in GATES else t for k, t in flat.items()}
    write_meta_dir(base, root / "base", CFG)
    files = {
        "a": flat,
        "b": training_checkpoint(CFG, base, adapter),
        "c": {f"module.{k}": t for k, t in flat.items()},
        "d": scalar,
        "d_broadcast": broadcast,
        "e_flat": {"adapter_query.weight": flat["adapter_query.weight"]},
        "e_full": no_gates_ckpt,
        "f": missing_base,
        "g": narrow,
        "inert": inert,
    }
    out: dict[str, Path | dict] = {k: save_zip(obj, root / f"{k}.pth") for k, obj in files.items()}
    out["base_dir"] = root / "base"
    out["base_sd"] = base
    out["adapter_sd"] = adapter
    return out


def load(v, which: str | None = None, *, kind: str = "adapter", **kw):
    extra = {} if which is None else {kind: open_checkpoint(v[which])}
    return load_model(open_checkpoint(v["base_dir"]), max_seq_len=32, **extra, **kw)


TOKENS = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS, 0, model.new_cache(TOKENS.shape[0]), all_logits=True)


def ids(report) -> list[str]:
    return [f.id for f in report.findings]


def only(report, fid: str):
    (found,) = [f for f in report.findings if f.id == fid]
    return found


@pytest.fixture(scope="module")
def base_logits(v) -> torch.Tensor:
    model, report = load(v)
    assert report.args.adapter_layer == 0 and report.from_file == []
    return logits(model)


@pytest.fixture(scope="module")
def strict_a(v) -> torch.Tensor:
    model, report = load(v, "a")
    assert report.findings == [] and report.unexpected == []
    assert sorted(report.from_file) == sorted(["adapter_query.weight", *GATES])
    assert (report.args.adapter_len, report.args.adapter_layer) == (4, 2)
    return logits(model)


# ------------------------------------------------------------------------ (a), (b): strict


def test_strict_adapter_equals_strict_full_and_differs_from_base(v, base_logits, strict_a):
    full, report = load(v, "b", kind="full")
    assert ids(report) == []
    assert len(report.from_file) == report.model_keys  # every model key came from the file
    got = logits(full)
    assert torch.equal(got, strict_a)
    assert not torch.equal(strict_a, base_logits)
    assert (strict_a - base_logits).abs().max() > 1e-5


# ---------------------------------------------------------------------------- upstream mode


def test_upstream_training_checkpoint_loads_nothing(v, base_logits):
    model, report = load(v, "b", kind="full", load_as="upstream")
    nothing = only(report, "LOAD_NOTHING")
    assert nothing.severity == "error"  # a smoke run really loaded it that way
    # both counts are named: the model's keys and the file's top-level keys
    assert f"0 of the model's {report.model_keys} keys" in nothing.message
    assert "the file's 5 top-level keys" in nothing.message
    assert "extract them" in nothing.hint  # a container: take the tensors out
    assert report.from_file == []
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(report.unexpected)
    assert report.args.adapter_layer == CFG.adapter_layer  # the adapter is there, but inert
    assert torch.equal(logits(model), base_logits)
    # The adapter file's gates are kept at their zero init.
    assert all(not model.layers[i].attention.gate.any() for i in range(CFG.n_layers))


def test_upstream_flat_adapter_matches_every_key(v, strict_a):
    model, report = load(v, "a", load_as="upstream")
    assert "LOAD_NOTHING" not in ids(report)
    assert len(report.from_file) == 1 + CFG.n_layers
    assert sorted(report.from_file) == sorted(["adapter_query.weight", *GATES])
    assert report.unexpected == []
    assert torch.equal(logits(model), strict_a)


# ------------------------------------------------------------------------ (c) module. prefix


def test_module_prefix_strict_resolves_upstream_loads_nothing(v, base_logits, strict_a):
    model, report = load(v, "c")
    assert sorted(report.from_file) == sorted(["adapter_query.weight", *GATES])
    assert torch.equal(logits(model), strict_a)

    model, report = load(v, "c", load_as="upstream")
    nothing = only(report, "LOAD_NOTHING")
    assert nothing.severity == "error"
    assert nothing.hint.startswith("strip the prefix: ckpt-doctor repair ")  # not "extract"
    assert report.from_file == []
    assert all(k.startswith("module.") for k in report.unexpected)
    assert torch.equal(logits(model), base_logits)


# ------------------------------------------------------------------------ (d) scalar gates


def test_scalar_gates_strict_broadcasts(v, strict_a):
    model, report = load(v, "d")
    shape = only(report, "GATE_SHAPE")
    assert sorted(shape.evidence["layers"]) == list(range(CFG.n_layers))
    # counted over the file's gates, and it says so (inspect counts the adapted layers')
    assert f"{CFG.n_layers} of the file's {CFG.n_layers} gates" in shape.message
    for name in GATES:
        assert model.get_parameter(name).shape == (1, CFG.n_heads, 1, 1)
    per_head, per_head_report = load(v, "d_broadcast")
    assert "GATE_SHAPE" not in ids(per_head_report)
    assert torch.equal(logits(model), logits(per_head))
    assert not torch.equal(logits(model), strict_a)  # different gates than (a)


def test_scalar_gates_upstream_raises_like_torch(v):
    with pytest.raises(ModelLoadError) as info:
        load(v, "d", load_as="upstream")
    assert info.value.code == "GATE_SHAPE"
    assert "[1]" in info.value.message and "[1, 4, 1, 1]" in info.value.message


# ------------------------------------------------------------------- (e) adapter w/o gates


def test_full_checkpoint_without_gates_is_adapter_missing(v, base_logits):
    model, report = load(v, "e_full", kind="full")
    missing = only(report, "ADAPTER_MISSING")
    assert missing.severity == "error"
    assert sorted(missing.evidence["tensors"]) == [GATES[i] for i in CFG.adapted_layers]
    assert torch.equal(logits(model), base_logits)  # zero gates: exactly the base


def test_flat_adapter_without_gates_is_adapter_missing(v, base_logits):
    model, report = load(v, "e_flat")
    assert "ADAPTER_MISSING" in ids(report)
    assert torch.equal(logits(model), base_logits)


def test_flat_inert_adapter_loads_as_the_base(v, base_logits):
    model, report = load(v, "inert")
    assert "ADAPTER_INERT" in ids(report)
    assert torch.equal(logits(model), base_logits)


# ------------------------------------------------------- (f) full checkpoint missing a tensor


def test_full_missing_base_tensor_uses_the_base(v, strict_a):
    model, report = load(v, "f", kind="full")
    missing = only(report, "MISSING_TENSORS")
    assert missing.severity == "error"
    assert missing.evidence["tensors"] == [DROPPED]
    assert DROPPED not in report.from_file
    assert torch.equal(model.get_parameter(DROPPED).detach(), v["base_sd"][DROPPED].float())
    assert torch.equal(logits(model), strict_a)


# ------------------------------------------------------------------- (g) wrong query width


@pytest.mark.parametrize("load_as", ["strict", "upstream"])
def test_adapter_query_width_wrong_raises(v, load_as):
    with pytest.raises(ModelLoadError) as info:
        load(v, "g", load_as=load_as)
    assert info.value.code == "ADAPTER_SHAPE"
    assert "adapter_query.weight" in info.value.message


# ---------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        ("auto", torch.float32),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ],
)
def test_dtype(v, strict_a, dtype, want):
    model, report = load(v, "a", dtype=dtype)
    assert report.dtype == str(want).removeprefix("torch.")
    assert {p.dtype for p in model.parameters()} == {want}
    got = logits(model)
    assert got.dtype == torch.float32
    if want == torch.float32:
        assert torch.equal(got, strict_a)
    else:
        assert torch.isfinite(got).all()
        assert (got - strict_a).abs().max() < 0.05


# ------------------------------------------------------------- fp16 weights share the file map


BIG = TinyConfig(dim=1024, n_layers=2, n_heads=8, multiple_of=256, vocab_size=1024)


def file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of /proc/self/maps mappings of ``path``."""
    target = str(path.resolve())
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def rss_anon() -> int:
    """RssAnon now, after handing freed heap back to the OS: otherwise a new allocation may
    reuse pages an earlier test freed and the growth we look for would not show."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    m = re.search(r"^RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert m
    return int(m.group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_fp16_load_shares_the_file_map(tmp_path):
    (shard,) = write_meta_dir(base_state_dict(BIG), tmp_path / "big", BIG)
    base = open_checkpoint(tmp_path / "big")
    weight_bytes = base.total_bytes
    assert weight_bytes > 50e6

    # Warm-up: the first model built in a process imports parts of torch (tens of MB of heap).
    load_model(base, dtype="float16", max_seq_len=16)
    before = rss_anon()
    model, report = load_model(base, dtype="float16", max_seq_len=16)
    grown = rss_anon() - before
    assert report.dtype == "float16"
    ranges = file_ranges(shard)
    assert ranges, "the shard is not memory-mapped"
    base_params = {  # the adapter's parameters are zeros made by the loader, not file tensors
        n: p
        for n, p in model.named_parameters()
        if n != "adapter_query.weight" and not n.endswith(".gate")
    }
    assert len(base_params) == 2 + 9 * BIG.n_layers + 1
    for name, p in base_params.items():
        start = p.untyped_storage().data_ptr()
        end = start + p.untyped_storage().nbytes()
        assert any(lo <= start and end <= hi for lo, hi in ranges), name
    # No second copy of the weights in anonymous memory (a copy would add > 50 MB).
    assert grown < 0.2 * weight_bytes, (grown, weight_bytes)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), 0, model.new_cache(1, 8))
    assert out.shape == (1, BIG.vocab_size) and torch.isfinite(out).all()
    del model, base_params, p

    # Contrast: converting to float32 must copy, so no parameter lives in the file map.
    before = rss_anon()
    model32, _ = load_model(base, dtype="float32", max_seq_len=16)
    assert rss_anon() - before > weight_bytes  # (the measurement does see a copy)
    ranges = file_ranges(shard)
    for name, p in model32.named_parameters():
        start = p.untyped_storage().data_ptr()
        assert not any(lo <= start < hi for lo, hi in ranges), name


def test_unknown_gate_function_is_a_usage_error(v):
    with pytest.raises(UsageError) as info:
        load(v, "a", gate_fn="bogus")
    assert "raw or tanh" in info.value.hint


@pytest.mark.parametrize("dropped", ["tok_embeddings.weight", "norm.weight"])
def test_base_without_a_tensor_is_missing_tensors_not_internal(tmp_path, dropped):
    """The embedding (whose dtype the load uses) missing was an internal KeyError."""
    base = base_state_dict(CFG)
    del base[dropped]
    write_meta_dir(base, tmp_path / "base", CFG)
    with open_checkpoint(tmp_path / "base") as ckpt, pytest.raises(ModelLoadError) as info:
        load_model(ckpt)
    assert info.value.code == "MISSING_TENSORS"
    assert dropped in info.value.message and info.value.hint
