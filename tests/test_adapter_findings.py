"""The adapter and gate findings of the catalogue (docs/findings.md): one case that raises
each, one not (the rest: tests/test_findings.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fixtures.make_fixtures import TinyConfig, extracted_adapter
from tests.finding_builders import (
    ADAPTED,
    CFG,
    adapter,
    base_sd,
    ids,
    inspect,
    only,
    training,
    write_base,
)

# --------------------------------------------------------------------------- adapter


def training_without(*names: str) -> dict:
    """A training checkpoint whose model dict lost these adapter tensors."""
    obj = training()
    for name in names:
        del obj["model"][name]
    return obj


def test_adapter_missing_when_args_describe_an_adapter(tmp_path):
    report = inspect(tmp_path, training_without(*adapter()))
    f = only(report, "ADAPTER_MISSING", "error")
    assert "args describe a LLaMA-Adapter run" in f.message
    assert "adapter_query.weight" in f.message
    assert report.adapter is None


def test_adapter_missing_query(tmp_path):
    f = only(
        inspect(tmp_path, training_without("adapter_query.weight")), "ADAPTER_MISSING", "error"
    )
    assert "adapter_query.weight is missing" in f.message
    assert "layers.0.attention.gate" in f.message


@pytest.mark.parametrize("obj", [training, base_sd], ids=["training", "plain-base"])
def test_no_adapter_missing(tmp_path, obj):
    assert "ADAPTER_MISSING" not in ids(inspect(tmp_path, obj()))


def test_adapter_inert(tmp_path):
    ad = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in adapter().items()}
    report = inspect(tmp_path, training(ad))
    f = only(report, "ADAPTER_INERT", "error")
    assert "all 8 gate values of the 2 adapted layers" in f.message
    assert f.evidence["layers"] == ADAPTED


def test_inert_extracted_adapter_without_args(tmp_path):
    # Nothing says how many layers are adapted: inert, but 8 rows are not a shape error.
    ad = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in adapter().items()}
    report = inspect(tmp_path, extracted_adapter(CFG, ad), base=write_base(tmp_path))
    f = only(report, "ADAPTER_INERT", "error")
    assert "all 16 gate values of the 4 layers with a gate" in f.message
    assert ids(report) == {"ADAPTER_INERT"}


def test_adapter_not_inert_with_one_nonzero_gate(tmp_path):
    ad = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in adapter().items()}
    ad["layers.3.attention.gate"][0, 2] = 0.01
    assert "ADAPTER_INERT" not in ids(inspect(tmp_path, training(ad)))


def test_adapter_shape_width_differs_from_base(tmp_path):
    narrow = TinyConfig(dim=32)
    report = inspect(
        tmp_path, extracted_adapter(narrow, adapter(narrow)), base=write_base(tmp_path)
    )
    f = only(report, "ADAPTER_SHAPE", "error")
    assert "adapter_query.weight [8, 32]" in f.message
    assert "width 32 != model dim 64" in f.message
    assert f.evidence["shape"] == [8, 32]


def test_adapter_shape_rows_do_not_split(tmp_path):
    ad = adapter()
    ad["adapter_query.weight"] = ad["adapter_query.weight"][:7].clone()
    report = inspect(tmp_path, training(ad))
    f = only(report, "ADAPTER_SHAPE", "error")
    assert "its 7 rows do not split" in f.message
    assert "adapter_layer=2" in f.message


def test_no_adapter_shape_for_matching_adapter(tmp_path):
    report = inspect(tmp_path, extracted_adapter(CFG, adapter()), base=write_base(tmp_path))
    assert "ADAPTER_SHAPE" not in ids(report)


@pytest.mark.parametrize(
    ("override", "product"),
    [
        ({"adapter_len": 8}, "adapter_len=8 x adapter_layer=2 = 16"),
        ({"adapter_layer": 3}, "adapter_len=4 x adapter_layer=3 = 12"),
    ],
)
def test_adapter_config_args_disagree(tmp_path, override, product):
    report = inspect(tmp_path, training(args_overrides=override))
    f = only(report, "ADAPTER_CONFIG", "warning")
    assert product in f.message
    assert "adapter_query.weight has 8" in f.message
    assert f.evidence["rows"] == 8
    # The tensor shapes win and still resolve the real config.
    assert (report.adapter.adapter_len, report.adapter.adapter_layer) == (4, 2)
    assert report.adapter.source == "shapes"
    assert "ADAPTER_SHAPE" not in ids(report)


def test_no_adapter_config_when_args_fit(tmp_path):
    report = inspect(tmp_path, training())
    assert "ADAPTER_CONFIG" not in ids(report)
    assert report.adapter.source == "args"


# --------------------------------------------------------------------------- gates


def test_gate_shape_legacy_scalar(tmp_path):
    sd = extracted_adapter(CFG, adapter(scalar_gates=True))
    report = inspect(tmp_path, sd, base=write_base(tmp_path))
    f = only(report, "GATE_SHAPE", "error")
    assert "2 of the 2 adapted layers' gates are legacy scalars of shape [1]" in f.message
    assert "layers 2, 3" in f.message
    assert "[1, 4, 1, 1]" in f.message
    assert f.evidence == {"layers": ADAPTED, "repairable": True}


def test_gate_shape_wrong_head_count(tmp_path):
    three_heads = TinyConfig(n_heads=3)
    sd = extracted_adapter(three_heads, adapter(three_heads))
    report = inspect(tmp_path, sd, base=write_base(tmp_path))
    f = only(report, "GATE_SHAPE", "error")
    assert "[1, 3, 1, 1]" in f.message
    assert "4 heads" in f.message
    assert f.evidence == {"layers": ADAPTED, "repairable": False}


def test_no_gate_shape_for_per_head_gates(tmp_path):
    report = inspect(tmp_path, extracted_adapter(CFG, adapter()), base=write_base(tmp_path))
    assert "GATE_SHAPE" not in ids(report)


def test_gate_tanh_mismatch(tmp_path):
    ad = adapter()
    ad["layers.3.attention.gate"][0, 1] = 1.5
    f = only(inspect(tmp_path, training(ad)), "GATE_TANH_MISMATCH", "warning")
    assert "gate layer 3 head 1 = 1.5:" in f.message
    assert "1.66x" in f.message
    assert f.evidence["ratio"] == pytest.approx(1.5 / math.tanh(1.5))
    assert (f.evidence["layer"], f.evidence["head"]) == (3, 1)


def test_no_gate_tanh_mismatch_for_small_gates(tmp_path):
    ad = adapter()
    assert max(float(ad[f"layers.{i}.attention.gate"].abs().max()) for i in ADAPTED) <= 0.3
    assert "GATE_TANH_MISMATCH" not in ids(inspect(tmp_path, training(ad)))
