"""diff: every status, float64 statistics that match a direct computation, bounded chunks."""

from __future__ import annotations

import math

import pytest
import torch

from ckpt_doctor import numerics, render
from ckpt_doctor.diffing import diff_tensors
from ckpt_doctor.handles import from_torch


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
    report = diff_tensors(handles(fine), handles(base))
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
    assert report.counts["identical"] == 1


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
