"""diff: every status, float64 statistics that match a direct computation, bounded chunks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ckpt_doctor import numerics, render
from ckpt_doctor.cli import app
from ckpt_doctor.diffing import STATUSES, diff_tensors
from ckpt_doctor.families import LLAMA_ADAPTER_V1
from ckpt_doctor.handles import from_torch

BASE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / "base"


def handles(d: dict[str, torch.Tensor]):
    return {k: from_torch(k, v) for k, v in d.items()}


def direct_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = a.double() - b.double()
    return float(d.abs().max()), float(d.norm() / b.double().norm())


def test_every_status_is_classified():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g).half()
    base = {
        "same": w,
        "changed": w.clone(),
        "gone": w.clone(),
        "reshaped": w.clone(),
        "recast": w.clone(),
    }
    changed = w.clone()
    changed[2, 3] += 1
    fine = {
        "same": w.clone(),
        "changed": changed,
        "reshaped": torch.zeros(7, 5, dtype=torch.float16),
        "recast": w.float(),
        "adapter_query.weight": torch.ones(2, 5),
    }
    report = diff_tensors(handles(fine), handles(base), family=LLAMA_ADAPTER_V1)
    status = {t.name: t.status for t in report.tensors}
    assert status == {
        "same": "identical",
        "changed": "modified",
        "gone": "removed",
        "reshaped": "shape_changed",
        "recast": "dtype_changed",
        "adapter_query.weight": "added",
    }
    by_name = {t.name: t for t in report.tensors}
    assert by_name["changed"].n_diff == 1
    assert by_name["recast"].max_abs == 0.0  # fp16 -> fp32 is exact
    assert [t.name for t in report.adapter] == ["adapter_query.weight"]
    assert report.counts["identical"] == 1 and report.exit_code == 1
    same = diff_tensors(handles({"same": w}), handles({"same": w.clone()}))
    assert same.exit_code == 0


def test_statistics_match_direct_float64_and_chunking_does_not_matter(monkeypatch):
    g = torch.Generator().manual_seed(1)
    b = torch.randn(300, 70, generator=g).half()
    a = (b.float() + 1e-3 * torch.randn(300, 70, generator=g)).half()
    expected = direct_stats(a, b)
    whole = numerics.compare(from_torch("a", a), from_torch("b", b))
    monkeypatch.setattr(numerics, "STATS_CHUNK_ELEMS", 64)
    monkeypatch.setattr(numerics, "BITWISE_CHUNK_ELEMS", 64)
    chunked = numerics.compare(from_torch("a", a), from_torch("b", b))
    for got in (whole, chunked):
        assert got.max_abs == pytest.approx(expected[0], rel=0, abs=0)
        assert got.rel_l2 == pytest.approx(expected[1], rel=1e-12)
        assert got.n_diff == int((a != b).sum())


def test_identical_bits_including_nan_are_identical():
    t = torch.tensor([1.0, float("nan"), 3.0])
    got = numerics.compare(from_torch("a", t), from_torch("b", t.clone()))
    assert got.identical and got.max_abs == 0.0


def test_nan_difference_is_reported_as_nan():
    a = torch.tensor([1.0, float("nan"), 3.0])
    b = torch.tensor([1.0, 2.0, 3.0])
    got = numerics.compare(from_torch("a", a), from_torch("b", b))
    assert not got.identical and math.isnan(got.max_abs)
    report = diff_tensors(handles({"x": a}), handles({"x": b}))
    row = report.to_json()["tensors"][0]
    assert math.isnan(row["max_abs"]) and math.isnan(row["rel_l2"])  # numbers, not words
    # JSON has no NaN: the one encoder (render.json_safe, used by print_json) makes it null.
    safe = render.json_safe(report.to_json())["tensors"][0]
    assert safe["max_abs"] is None and safe["rel_l2"] is None and safe["n_diff"] == 1


def test_per_layer_summary_groups_by_layer():
    t = torch.zeros(2)
    base = {"layers.0.a": t, "layers.1.a": t, "norm.weight": t}
    fine = {"layers.0.a": t + 1, "layers.1.a": t, "norm.weight": t}
    rows = diff_tensors(handles(fine), handles(base)).per_layer()
    assert [(r.layer, r.counts) for r in rows] == [
        (0, {"modified": 1}),
        (1, {"identical": 1}),
        (None, {"identical": 1}),
    ]


def test_a_new_dtype_with_new_values_is_modified_not_just_recast():
    """fp32 weights that drifted from an fp16 base changed value: BASE_MODIFIED territory."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 5, generator=g).half()
    drifted = w.float()
    drifted[0] += 0.5
    report = diff_tensors(handles({"w": drifted}), handles({"w": w}))
    (row,) = report.tensors
    assert row.status == "modified" and row.n_diff == 5 and row.max_abs == 0.5
    assert (row.dtype, row.base_dtype) == ("float32", "float16")  # the recast is still there
    assert [t.name for t in report.recast] == ["w"]


@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16])
def test_rounding_to_the_narrower_dtype_is_only_a_recast(narrow):
    """An fp16/bf16 save of fp32 weights (or fp32 master weights of a half base) keeps the
    values up to rounding: dtype_changed, either way round."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 30, generator=g) * 100
    wide[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    half = wide.to(narrow)
    for fine, base in ((half, wide), (wide, half)):
        (row,) = diff_tensors(handles({"w": fine}), handles({"w": base})).tensors
        assert row.status == "dtype_changed" and row.max_abs != 0.0
    off = half.clone()
    off[5, 5] = off[5, 5] * 2 + 1  # one value really changed
    (row,) = diff_tensors(handles({"w": off}), handles({"w": wide})).tensors
    assert row.status == "modified"


def test_integer_recast_with_equal_values_is_dtype_changed():
    t = torch.arange(12).reshape(3, 4)
    report = diff_tensors(handles({"i": t.int(), "j": t.int()}), handles({"i": t, "j": t + 1}))
    assert [r.status for r in report.tensors] == ["dtype_changed", "modified"]


def test_cli_full_fp32_checkpoint_with_a_drifted_tensor_against_an_fp16_base(tmp_path):
    """The reviewer's case: only DTYPE_CHANGED (info, exit 0) before; now BASE_MODIFIED."""
    state = torch.load(BASE / "consolidated.00.pth", weights_only=True)
    full = {k: v.float() for k, v in state.items()}
    full["layers.0.attention.wq.weight"] += 0.5
    path = tmp_path / "full.pth"
    torch.save(full, path)
    result = CliRunner().invoke(app, ["diff", str(path), "--base", str(BASE), "--json"])
    doc = json.loads(result.stdout)
    assert {t["status"] for t in doc["tensors"]} <= set(STATUSES)
    modified = [t["name"] for t in doc["tensors"] if t["status"] == "modified"]
    assert modified == ["layers.0.attention.wq.weight"] and result.exit_code == 1
    result = CliRunner().invoke(app, ["inspect", str(path), "--base", str(BASE), "--json"])
    ids = {f["id"]: f for f in json.loads(result.stdout)["findings"]}
    assert ids["BASE_MODIFIED"]["evidence"]["tensors"] == ["layers.0.attention.wq.weight"]
    # Every tensor changed dtype, the drifted one included: still reported, as info.
    assert len(ids["DTYPE_CHANGED"]["evidence"]["tensors"]) == len(state)
    assert ids["DTYPE_CHANGED"]["severity"] == "info" and result.exit_code == 1
