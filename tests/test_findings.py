"""Every inspect finding of the catalogue (docs/findings.md): one case that raises it, one not.

Each raising case checks the id, the severity the catalogue gives it, and that the message carries
the evidence (a tensor name or a number). Variants are built from the fixture functions in
tmp_path: copy a dict, mutate it, save it.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch

from ckpt_doctor.errors import EmptyFileError, UnreadableError, UnsafePickleError
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import (
    TinyConfig,
    extracted_adapter,
    save_safetensors,
    save_zip,
)
from tests.finding_builders import (
    ADAPTED,
    CFG,
    adapter,
    base_sd,
    full_sd,
    ids,
    inspect,
    inspect_path,
    only,
    training,
    write_base,
)

BUNDLE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny"
SYSTEM = f"{os.system.__module__}.{os.system.__name__}"  # posix.system on Linux


# --------------------------------------------------------------------------- UNREADABLE


def _save_then_truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "random.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _pickle_magic_then_garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x80\x02" + random.Random(1).randbytes(4096))
    return path


def _truncated_zip(tmp_path: Path) -> Path:
    return _save_then_truncate(save_zip(training(), tmp_path / "checkpoint-4.pth"))


def _truncated_safetensors(tmp_path: Path) -> Path:
    return _save_then_truncate(save_safetensors(full_sd(), tmp_path / "model.safetensors"))


def _bad_params_json(tmp_path: Path) -> Path:
    directory = write_base(tmp_path)
    (directory / "params.json").write_text('{"dim": 64, "n_layers": ')
    return directory


@pytest.mark.parametrize(
    ("build", "evidence"),
    [
        (_random_bytes, "random.pth"),
        (_pickle_magic_then_garbage, "garbage.pth"),
        (_truncated_zip, "checkpoint-4.pth"),
        (_truncated_safetensors, "model.safetensors"),
        (_bad_params_json, "params.json"),
    ],
    ids=["random", "pickle-magic", "truncated-zip", "truncated-safetensors", "bad-params"],
)
def test_unreadable_raises(tmp_path, build, evidence):
    path = build(tmp_path)
    with pytest.raises(UnreadableError) as info:
        open_checkpoint(path)
    assert info.value.code == "UNREADABLE"
    assert info.value.exit_code == 2
    assert evidence in info.value.message
    assert info.value.hint


def test_empty_file_is_unreadable_with_code_empty(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(EmptyFileError) as info:
        open_checkpoint(path)
    assert isinstance(info.value, UnreadableError)
    assert info.value.code == "EMPTY"
    assert "0 bytes" in info.value.message


@pytest.mark.parametrize(
    "save",
    [
        lambda p: save_zip(training(), p / "checkpoint-4.pth"),
        lambda p: save_safetensors(full_sd(), p / "model.safetensors"),
        write_base,
    ],
    ids=["zip", "safetensors", "meta-dir"],
)
def test_intact_files_open(tmp_path, save):
    ckpt = open_checkpoint(save(tmp_path))
    assert len(ckpt.tensors) >= len(base_sd())


# --------------------------------------------------------------------------- UNSAFE_PICKLE


class _Payload:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = save_zip({**adapter(), "payload": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafePickleError) as info:
        open_checkpoint(path)
    assert info.value.code == "UNSAFE_PICKLE"
    assert SYSTEM in info.value.globals_found
    assert SYSTEM in info.value.message
    assert not marker.exists()


def test_argparse_namespace_is_allowed(tmp_path):
    # The training checkpoint's 'args' is an argparse.Namespace: allowed, nothing broader.
    ckpt = open_checkpoint(save_zip(training(), tmp_path / "checkpoint-4.pth"))
    assert "argparse.Namespace" in ckpt.pickle_globals
    assert ckpt.args["adapter_len"] == CFG.adapter_len


# --------------------------------------------------------------------------- EMPTY


def test_empty_when_no_tensors(tmp_path):
    f = only(inspect(tmp_path, {}), "EMPTY", "error")
    assert "no tensors" in f.message


def test_empty_when_a_tensor_has_zero_elements(tmp_path):
    sd = {"adapter_query.weight": torch.zeros(0, CFG.dim), **base_sd()}
    f = only(inspect(tmp_path, sd), "EMPTY", "error")
    assert "1 tensor(s)" in f.message
    assert "adapter_query.weight" in f.message
    assert f.evidence["tensors"] == ["adapter_query.weight"]


def test_no_empty_for_a_full_checkpoint(tmp_path):
    assert "EMPTY" not in ids(inspect(tmp_path, full_sd()))


# --------------------------------------------------------------------------- containers


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict"])
def test_container_nested(tmp_path, key):
    report = inspect(tmp_path, {key: full_sd(), "epoch": 7})
    f = only(report, "CONTAINER_NESTED", "info")
    assert f"['{key}']" in f.message
    assert "epoch (7)" in f.message
    assert report.container_path == (key,)


def test_load_nothing_for_training_checkpoint(tmp_path):
    f = only(inspect(tmp_path, training()), "LOAD_NOTHING", "error")
    assert "0 of the model's 44 keys" in f.message
    assert "none of the file's 5 top-level keys" in f.message
    assert "model, optimizer, epoch, scaler, args" in f.message
    # what is counted is named: the file's keys vs the model's (44 for the tiny config)
    assert "the model's 44 keys" in f.message
    assert f.evidence == {"keys_seen": 5, "matched": 0, "model_keys": 44}


def test_flat_files_load_something(tmp_path):
    report = inspect(tmp_path, extracted_adapter(CFG, adapter()))
    assert not ids(report) & {"CONTAINER_NESTED", "LOAD_NOTHING", "KEY_PREFIX"}


@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod."])
def test_key_prefix(tmp_path, prefix):
    report = inspect(tmp_path, {prefix + k: v for k, v in full_sd().items()})
    f = only(report, "KEY_PREFIX", "warning")
    n = len(full_sd())
    assert f"{n} of {n} keys carry the prefix '{prefix}'" in f.message
    assert "0% as saved and 100% after" in f.message
    assert f.evidence == {"prefix": prefix, "overlap_before": 0.0, "overlap_after": 1.0}
    # The names are canonical underneath: model facts still come out of the shapes.
    assert (report.facts.dim, report.facts.n_layers) == (CFG.dim, CFG.n_layers)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "words"), [(math.nan, "1 NaN, 0 Inf"), (math.inf, "0 NaN, 1 Inf")]
)
def test_nonfinite(tmp_path, value, words):
    sd = extracted_adapter(CFG, adapter())
    sd["adapter_query.weight"][3, 5] = value
    f = only(inspect(tmp_path, sd), "NONFINITE", "error")
    assert f"1 non-finite values ({words})" in f.message
    assert "in 1 tensor(s): adapter_query.weight" in f.message  # named once
    assert f.message.count("adapter_query.weight") == 1
    assert f.evidence["count"] == 1


def test_fp16_overflow(tmp_path):
    sd = extracted_adapter(CFG, adapter())
    sd["adapter_query.weight"][0, 0] = 1e6
    f = only(inspect(tmp_path, sd), "FP16_OVERFLOW", "warning")
    assert "adapter_query.weight" in f.message
    assert "1 finite values" in f.message
    assert "1e+06" in f.message
    assert f.evidence["max_abs"] == 1e6


def test_healthy_values(tmp_path):
    report = inspect(tmp_path, extracted_adapter(CFG, adapter()))
    assert not ids(report) & {"NONFINITE", "FP16_OVERFLOW"}


def test_fp16_tensors_near_the_limit_do_not_overflow(tmp_path):
    sd = base_sd()
    sd["norm.weight"][0] = 65504.0  # the fp16 max itself is representable
    assert "FP16_OVERFLOW" not in ids(inspect(tmp_path, sd))


# --------------------------------------------------------------------------- optimizer


def test_optimizer_state(tmp_path):
    obj = training()
    f = only(inspect(tmp_path, obj), "OPTIMIZER_STATE", "info")
    assert "'optimizer' carries optimizer state for 3 params, 9 tensors" in f.message
    state = obj["optimizer"]["state"].values()
    expected = sum(t.numel() * t.element_size() for s in state for t in s.values())
    assert f.evidence["bytes"] == expected


def test_no_optimizer_state_without_optimizer(tmp_path):
    obj = training()
    del obj["optimizer"]
    report = inspect(tmp_path, obj)
    assert "OPTIMIZER_STATE" not in ids(report)
    assert "CONTAINER_NESTED" in ids(report)


# --------------------------------------------------------------------------- against a base


def test_base_mismatch(tmp_path):
    report = inspect(tmp_path, full_sd(), base=write_base(tmp_path, TinyConfig(dim=32)))
    f = only(report, "BASE_MISMATCH", "error")
    n_base = len(base_sd())
    assert f"{n_base} of {n_base} shared tensors differ in shape" in f.message
    assert "tok_embeddings.weight [128, 64] vs base [128, 32]" in f.message
    # Same vocabulary, other width: not a resized vocabulary.
    assert "VOCAB_MISMATCH" not in ids(report)


def test_base_modified(tmp_path):
    obj = training()
    name = "layers.1.attention.wq.weight"
    before = obj["model"][name].clone()
    obj["model"][name][5, 7] += 0.25
    delta = float((obj["model"][name].double() - before.double()).abs().max())
    report = inspect(tmp_path, obj, base=write_base(tmp_path))
    f = only(report, "BASE_MODIFIED", "warning")
    assert f"1 frozen base tensor(s) differ from the base: {name} (max |Δ| {delta:.3g}" in f.message
    assert f.evidence["tensors"] == [name]


def test_missing_tensors(tmp_path):
    sd = full_sd()
    del sd["layers.2.feed_forward.w2.weight"]
    f = only(inspect(tmp_path, sd, base=write_base(tmp_path)), "MISSING_TENSORS", "error")
    assert "1 base tensor(s) are absent" in f.message
    assert "layers.2.feed_forward.w2.weight" in f.message


def test_vocab_mismatch(tmp_path):
    sd = full_sd()
    for name in ("tok_embeddings.weight", "output.weight"):
        sd[name] = torch.cat([sd[name], torch.zeros(2, CFG.dim, dtype=sd[name].dtype)])
    report = inspect(tmp_path, sd, base=write_base(tmp_path))
    found = {f.evidence["tensor"]: f for f in report.findings if f.id == "VOCAB_MISMATCH"}
    assert set(found) == {"tok_embeddings.weight", "output.weight"}
    for name, f in found.items():
        assert f.severity == "error"
        assert f"{name} has 130 rows, the base has 128" in f.message
        assert "+2 tokens" in f.message
    assert "BASE_MISMATCH" not in ids(report)


def test_dtype_changed(tmp_path):
    sd = full_sd()
    sd["norm.weight"] = sd["norm.weight"].float()
    report = inspect(tmp_path, sd, base=write_base(tmp_path))
    f = only(report, "DTYPE_CHANGED", "info")
    assert "1 tensor(s) changed dtype from the base (float16->float32): norm.weight" in f.message
    # Upcasting keeps the values: no drift reported.
    assert "BASE_MODIFIED" not in ids(report)


def test_healthy_full_checkpoint_against_its_base(tmp_path):
    report = inspect(tmp_path, full_sd(), base=write_base(tmp_path))
    assert ids(report) == set()
    assert report.exit_code == 0
    assert report.diff.counts["identical"] == len(base_sd())
    assert report.diff.counts["added"] == len(adapter())


# --------------------------------------------------------------------------- adapter-only files


@pytest.mark.parametrize(
    "save",
    [
        lambda sd, p: save_zip(sd, p / "adapter.pth"),
        lambda sd, p: save_safetensors(sd, p / "adapter.safetensors"),
    ],
    ids=["pth", "safetensors"],
)
@pytest.mark.parametrize("layout", ["extracted", "flat"])
def test_adapter_only_with_base(tmp_path, save, layout):
    ad = adapter()
    sd = extracted_adapter(CFG, ad) if layout == "extracted" else ad
    report = inspect_path(save(sd, tmp_path), base=write_base(tmp_path))
    assert report.exit_code == 0, [f.message for f in report.findings]
    assert not [f for f in report.findings if f.severity != "info"]
    facts = report.facts
    assert (facts.dim, facts.n_heads, facts.n_layers) == (CFG.dim, CFG.n_heads, CFG.n_layers)
    assert {facts.sources[k] for k in ("dim", "n_heads", "n_layers")} == {"params.json"}
    assert report.adapted_layers == ADAPTED
    assert (report.adapter.adapter_len, report.adapter.adapter_layer) == (4, 2)


# --------------------------------------------------------------------------- the seed bug


def _bundled(tmp_path: Path) -> tuple[Path, Path]:
    return BUNDLE / "checkpoint-4.pth", BUNDLE / "base"


def _built(tmp_path: Path) -> tuple[Path, Path]:
    return save_zip(training(), tmp_path / "checkpoint-4.pth"), write_base(tmp_path)


@pytest.mark.parametrize("files", [_bundled, _built], ids=["bundled", "built"])
def test_upstream_training_checkpoint_with_base(tmp_path, files):
    path, base = files(tmp_path)
    report = inspect_path(path, base=base)
    assert ids(report) == {"CONTAINER_NESTED", "LOAD_NOTHING", "OPTIMIZER_STATE"}
    # loading nothing as upstream does is the one error (an error wherever it is found)
    assert [f.id for f in report.findings if f.severity == "error"] == ["LOAD_NOTHING"]
    assert report.exit_code == 1
    assert report.adapter.source == "args"
    assert (report.adapter.adapter_len, report.adapter.adapter_layer) == (4, 2)
    assert [r.layer for r in report.gates] == ADAPTED
    assert [r.prompt_index for r in report.gates] == [0, 1]
    expected = adapter()
    for row in report.gates:
        g = expected[f"layers.{row.layer}.attention.gate"].reshape(-1)
        assert row.g == pytest.approx(g.tolist())
        assert row.tanh_g == pytest.approx(torch.tanh(g).tolist())
        assert len(row.g) == len(row.tanh_g) == CFG.n_heads
