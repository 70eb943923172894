"""Hostile and damaged inputs to the readers: no crash, no hang, no blow-up.

One test (or a few) per finding of the attack campaign, each on a minimal file built here
(tests/hostile_files.py writes torch zips, legacy files and safetensors byte for byte).
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ckpt_doctor import bounds, reader, ziparchive
from ckpt_doctor.errors import UnreadableError
from ckpt_doctor.inspection import inspect_checkpoint
from ckpt_doctor.numerics import scan_values
from ckpt_doctor.reader import open_checkpoint
from tests.hostile_files import (
    Call,
    Storage,
    Tensor,
    dumps,
    floats,
    legacy,
    safetensors_file,
    torch_zip,
)

ROOT = Path(__file__).resolve().parents[1]
STORAGE = Storage("0", floats(*range(16)))


def _cli(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process (a segfault there is a return code, not a dead test run);
    ``limit_bytes`` caps its address space, so an allocation bug fails instead of swapping."""

    def limit() -> None:
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    cmd = [sys.executable, "-m", "ckpt_doctor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=limit)


def _refused(proc: subprocess.CompletedProcess, code: str = "UNREADABLE") -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error [{code}]"), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- segfaults


@pytest.mark.parametrize(
    ("size", "stride", "offset", "why"),
    [
        ((4, 4), (2**40, 1), 0, "reaches element"),  # segfaulted: a view far outside the map
        ((4, 4), (-4, 1), 0, "negative"),  # segfaulted: a view before the storage
        ((4, 5), (5, 1), 0, "reaches element 19 of a storage of 16"),  # read past storage
        ((4, 4), (4, 1), 1, "reaches element 16 of a storage of 16"),  # offset past the end
        ((4, 4), (1, 1), 0, "overlap"),  # a view whose rows overlap
        ((2, 2), (1, 2), 2**62, "reaches element"),  # an offset beyond any file
    ],
)
def test_views_outside_their_storage_are_unreadable(tmp_path, size, stride, offset, why):
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, size, stride, offset)})
    line = _refused(_cli("inspect", str(path)))
    assert why in line
    with pytest.raises(UnreadableError, match=why):
        open_checkpoint(path)


def test_a_storage_claiming_more_than_its_member_is_unreadable(tmp_path):
    big = Storage("0", floats(*range(16)), numel=1 << 40)
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(big, (4, 4), (4, 1))})
    with pytest.raises(UnreadableError, match="claims"):
        open_checkpoint(path)


def test_a_legal_transposed_view_still_reads_exactly(tmp_path):
    path = torch_zip(tmp_path / "t.pth", {"w": Tensor(STORAGE, (4, 4), (1, 4))})
    with open_checkpoint(path) as ckpt:
        expected = np.arange(16, dtype=np.float32).reshape(4, 4).T
        assert np.array_equal(ckpt.tensors["w"].array(), expected)
        assert np.array_equal(ckpt.tensors["w"].to_torch().numpy(), expected)


# --------------------------------------------------------------------------- blow-ups


def test_layer_index_of_1e8_in_a_tiny_safetensors_is_unreadable(tmp_path):
    header = {
        "layers.100000000.attention.gate": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    }
    path = safetensors_file(tmp_path / "a.safetensors", header, floats(0.5))
    assert path.stat().st_size < 300
    line = _refused(_cli("inspect", str(path), limit_bytes=2 << 30))
    assert "layer 100000000" in line


def test_layer_index_of_1e8_in_a_pickle_is_unreadable(tmp_path):
    path = torch_zip(
        tmp_path / "a.pth", {"layers.100000000.attention.gate": Tensor(STORAGE, (1,), (1,))}
    )
    with pytest.raises(UnreadableError, match="beyond any model"):
        open_checkpoint(path)


@pytest.mark.parametrize("n_layers", [100000000, 1e8, -3, 4.0, True, "4", [4], None])
def test_params_json_layer_count_is_checked(tmp_path, n_layers):
    base = tmp_path / "base"
    base.mkdir()
    torch_zip(base / "consolidated.00.pth", {"norm.weight": Tensor(STORAGE, (16,), (1,))})
    (base / "params.json").write_text(json.dumps({"dim": 16, "n_layers": n_layers}))
    if n_layers is None:  # absent value: facts come from the shapes
        assert open_checkpoint(base).params == {"dim": 16, "n_layers": None}
        return
    with pytest.raises(UnreadableError, match=r"params\.json") as info:
        open_checkpoint(base)
    assert "n_layers" in info.value.message


def test_bytearray_of_3_gib_in_a_60_byte_pickle_is_refused_not_allocated(tmp_path):
    data = dumps({"x": Call("builtins", "bytearray", (3 << 30,))})
    assert len(data) < 80
    path = torch_zip(tmp_path / "b.pth", None, pickle_bytes=data)
    line = _refused(_cli("inspect", str(path), limit_bytes=2 << 30))
    assert "bytearray(3221225472)" in line


def test_a_member_inflating_1000x_is_refused(tmp_path):
    path = torch_zip(tmp_path / "ok.pth", {"w": Tensor(STORAGE, (16,), (1,))})
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/extra.pkl", b"\x80\x02N." + bytes(32 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(UnreadableError, match="would inflate"):
        open_checkpoint(path)


def test_a_sparse_safetensors_bigger_than_ram_opens(tmp_path):
    """Mapped read-only and shared: nothing is committed, only the pages read are touched."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = (2 * ram) // (4096 * 2) + 1
    end = rows * 8192
    header = {
        "tok_embeddings.weight": {"dtype": "F16", "shape": [rows, 4096], "data_offsets": [0, end]},
        "layers.0.attention.gate": {
            "dtype": "F32",
            "shape": [1, 4, 1, 1],
            "data_offsets": [end, end + 16],
        },
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + rows * 8192 + 16)  # a hole: no disk, no RAM
    with open_checkpoint(path) as ckpt:
        emb = ckpt.tensors["tok_embeddings.weight"]
        assert emb.nbytes > ram
        assert not emb.rows(0, 2).any()
        report = inspect_checkpoint(ckpt)  # metadata and the adapter's values only
        assert report.findings is not None


# --------------------------------------------------------------------------- hangs


def test_an_expanded_view_is_scanned_over_its_storage(tmp_path):
    """stride 0: a million rows repeating 16 stored floats scan as 16 values."""
    nan = Storage("0", floats(float("nan"), *range(15)))
    path = torch_zip(tmp_path / "e.pth", {"w": Tensor(nan, (1 << 20, 16), (0, 1))})
    with open_checkpoint(path) as ckpt:
        handle = ckpt.tensors["w"]
        assert handle.expanded == (0,)
        start = time.perf_counter()
        scan = scan_values(handle)
        assert time.perf_counter() - start < 1.0
        assert scan.nan == scan.nonfinite == 1 << 20  # one NaN per repeated row
        assert scan.max_abs == 14.0


def test_an_expanded_view_of_10_to_12_elements_is_refused_quickly(tmp_path):
    path = torch_zip(tmp_path / "e.pth", {"w": Tensor(STORAGE, (10**6, 10**6, 16), (0, 0, 1))})
    start = time.perf_counter()
    with pytest.raises(UnreadableError, match="claims"):
        open_checkpoint(path)
    assert time.perf_counter() - start < 5.0


def test_a_base_whose_params_say_1e8_layers_is_refused_before_any_model_is_built(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    torch_zip(base / "consolidated.00.pth", {"norm.weight": Tensor(STORAGE, (16,), (1,))})
    (base / "params.json").write_text(json.dumps({"dim": 16, "n_layers": 100000000}))
    proc = _cli("smoke-generate", "--base", str(base), "--prompt", "hi", limit_bytes=4 << 30)
    assert "n_layers" in _refused(proc)


# --------------------------------------------------------------------------- one zip parse


def test_two_central_directories_are_refused(tmp_path):
    first = torch_zip(tmp_path / "a.pth", {"w": Tensor(STORAGE, (16,), (1,))}).read_bytes()
    second = torch_zip(tmp_path / "b.pth", {"v": Tensor(STORAGE, (16,), (1,))}).read_bytes()
    path = tmp_path / "two.pth"
    path.write_bytes(first + second)
    with pytest.raises(UnreadableError, match=r"two archives|end-of-archive"):
        open_checkpoint(path)


def test_a_case_colliding_member_is_refused(tmp_path):
    path = torch_zip(
        tmp_path / "c.pth", {"w": Tensor(STORAGE, (16,), (1,))}, extra=[("archive/DATA.PKL", b"N.")]
    )
    with pytest.raises(UnreadableError, match="letter case"):
        open_checkpoint(path)


def test_scan_and_load_share_one_parse_of_the_archive(tmp_path, monkeypatch):
    path = torch_zip(tmp_path / "ok.pth", {"w": Tensor(STORAGE, (16,), (1,))})
    calls = []
    real = ziparchive.read_table

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(reader, "read_table", counting)
    monkeypatch.setattr("ckpt_doctor.pickle_scan.read_table", counting)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt.tensors) == ["w"]
    assert calls == [path]


def test_a_zip_the_zip_reader_cannot_model_is_checked_before_torch_sees_it(tmp_path):
    """collections.Counter needs torch.load; the bytearray bomb beside it is caught first."""
    data = dumps(
        {"c": Call("collections", "Counter", ()), "x": Call("builtins", "bytearray", (3 << 30,))}
    )
    path = torch_zip(tmp_path / "b.pth", None, pickle_bytes=data)
    assert "bytearray" in _refused(_cli("inspect", str(path), limit_bytes=3 << 30))


def test_a_legacy_file_claiming_more_than_its_records_is_refused(tmp_path):
    lying = Storage("0", floats(*range(16)), numel=1 << 30)
    path = legacy(tmp_path / "l.pth", {"w": Tensor(lying, (4, 4), (4, 1))})
    assert "claims" in _refused(_cli("inspect", str(path), limit_bytes=3 << 30))


def test_a_legacy_file_listing_a_storage_it_never_used_is_unreadable(tmp_path):
    path = legacy(tmp_path / "l.pth", {"w": Tensor(STORAGE, (16,), (1,))}, keys=["0", "7"])
    with pytest.raises(UnreadableError, match="never used"):
        open_checkpoint(path)


def test_a_valid_legacy_file_still_reads(tmp_path):
    path = legacy(tmp_path / "l.pth", {"w": Tensor(STORAGE, (4, 4), (4, 1))})
    with open_checkpoint(path) as ckpt:
        assert np.array_equal(ckpt.tensors["w"].array().ravel(), np.arange(16, dtype=np.float32))


# --------------------------------------------------------------------------- directories


def _hf_dir(tmp_path: Path, shard_name: str) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    index = {"weight_map": {"model.norm.weight": shard_name}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize("entry", ["../../outside/x.safetensors", "/etc/passwd", "a/../../x"])
def test_index_entries_must_stay_inside_the_directory(tmp_path, entry):
    d = _hf_dir(tmp_path, entry)
    (tmp_path / "outside").mkdir()
    header = {"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    safetensors_file(tmp_path / "outside" / "x.safetensors", header, floats(1.0))
    with pytest.raises(UnreadableError, match="outside") as info:
        open_checkpoint(d)
    assert "root:" not in info.value.message


def test_a_symlink_leading_out_is_refused_and_its_bytes_never_shown(tmp_path):
    d = _hf_dir(tmp_path, "model.safetensors")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (d / "model.safetensors").symlink_to(secret)
    with pytest.raises(UnreadableError, match="leads outside") as info:
        open_checkpoint(d)
    assert "root:x" not in info.value.message


def test_a_non_checkpoint_file_passed_directly_is_not_echoed(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    line = _refused(_cli("inspect", str(secret)))
    assert "root" not in line.replace(str(tmp_path), "")


def test_hf_hub_cache_symlinks_into_blobs_are_inside(tmp_path):
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    header = {"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    safetensors_file(repo / "blobs" / "deadbeef", header, floats(1.0))
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    with open_checkpoint(snap) as ckpt:
        assert list(ckpt.tensors) == ["model.norm.weight"]


def test_every_file_a_directory_reader_opened_is_recorded(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    torch_zip(base / "consolidated.00.pth", {"norm.weight": Tensor(STORAGE, (16,), (1,))})
    (base / "params.json").write_text(json.dumps({"dim": 16}))
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    with open_checkpoint(base) as ckpt:
        assert set(ckpt.read_files) == {base / "consolidated.00.pth", base / "params.json"}
        assert set(ckpt.inputs()) >= {*ckpt.read_files, tmp_path / "tokenizer.model", base}


def test_view_budget_is_tied_to_the_file():
    budget = bounds.ViewBudget("f", 1000)
    budget.take(bounds.VIEW_SLACK, "a tensor")
    with pytest.raises(UnreadableError, match="claims"):
        budget.take(4001, "another")
