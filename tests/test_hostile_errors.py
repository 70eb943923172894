"""Every exception class the attack campaign saw end as INTERNAL is now a typed refusal
(UNREADABLE / USAGE / IO, exit 2, one line with a hint), fixed where the input is read.
And errors go to stderr, data to stdout: diagnose's refusal included."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_doctor import reader
from ckpt_doctor.cli import app
from ckpt_doctor.errors import UnreadableError
from ckpt_doctor.reader import open_checkpoint
from tests.hostile_files import (
    Call,
    Storage,
    Tensor,
    dumps,
    floats,
    legacy,
    patch_zip_flags,
    safetensors_file,
    torch_zip,
)

runner = CliRunner()
STORAGE = Storage("0", floats(*range(16)))
WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"


def _unreadable(path: Path, match: str) -> UnreadableError:
    with pytest.raises(UnreadableError, match=match) as info:
        open_checkpoint(path)
    assert info.value.hint
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [UNREADABLE]"), result.stderr
    assert "hint:" in lines[0]
    return info.value


def _pickle_zip(tmp_path: Path, obj: object) -> Path:
    return torch_zip(tmp_path / "x.pth", obj)


def test_float_sizes(tmp_path):  # was TypeError: 'float' object cannot be interpreted...
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, (4.0, 4), (4, 1))})
    _unreadable(path, "float where integers belong")


@pytest.mark.parametrize("size", [4, True, None])
def test_sizes_that_are_not_sequences(tmp_path, size):  # was 'int'/'bool' not iterable
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, size, (4, 1))})
    _unreadable(path, "size")


def test_a_storage_that_is_a_function(tmp_path):  # was 'function' has no attribute 'dtype'
    obj = {
        "w": Call(
            "torch._utils",
            "_rebuild_tensor_v2",
            (Call("collections", "OrderedDict"), 0, (1,), (1,)),
        )
    }
    _unreadable(_pickle_zip(tmp_path, obj), "storage")


def test_a_storage_that_is_an_int(tmp_path):  # was 'int' has no attribute 'dtype'
    obj = {"w": Call("torch._utils", "_rebuild_tensor_v2", (7, 0, (1,), (1,)))}
    _unreadable(_pickle_zip(tmp_path, obj), "storage is a int")


def test_a_pickle_popping_an_empty_stack(tmp_path):  # was IndexError: pop from empty list
    path = torch_zip(tmp_path / "x.pth", None, pickle_bytes=b"\x80\x020.")
    _unreadable(path, "cannot be read as a torch checkpoint")


def test_a_legacy_pickle_popping_an_empty_stack(tmp_path):
    path = tmp_path / "l.pth"
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {}))
    path.write_bytes(head + b"\x80\x02a.")
    _unreadable(path, "cannot be read as a torch checkpoint")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("params.json", "[1, 2]", "array, not an object"),  # was 'list' has no attribute 'get'
        ("params.json", "7", "number, not an object"),  # 'int' has no attribute 'get'
        ("params.json", '"x"', "string, not an object"),  # 'str' has no attribute 'get'
        ("params.json", '{"dim": [16]}', "dim is list"),
        ("params.json", '{"dim": 16.5}', "dim is float"),
        ("params.json", '{"norm_eps": "tiny"}', "norm_eps is str"),
        ("params.json", "{nope", "not valid JSON"),
        ("params.json", b"\xff\xfe{}", "not UTF-8"),  # was UnicodeDecodeError
        ("params.json", "[" * 100000 + "]" * 100000, "nested too deeply|not valid JSON"),
    ],
)
def test_malformed_params_json_names_the_file(tmp_path, name, content, match):
    base = tmp_path / "base"
    base.mkdir()
    torch_zip(base / "consolidated.00.pth", {"norm.weight": Tensor(STORAGE, (16,), (1,))})
    target = base / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    error = _unreadable(base, match)
    assert str(target) in error.message


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ([1, 2], "array, not an object"),
        ({"weight_map": ["a"]}, "weight_map is not a map"),
        ({"weight_map": {"x": 3}}, "weight_map is not a map"),
    ],
)
def test_malformed_index_json(tmp_path, index, match):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _unreadable(d, match)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ([], "array"),
        ({"num_hidden_layers": 1e8}, "n_layers is float"),
        ({"vocab_size": 2**70}, "vocab_size"),
    ],
)
def test_malformed_config_json(tmp_path, config, match):
    d = tmp_path / "hf"
    d.mkdir()
    header = {"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    safetensors_file(d / "model.safetensors", header, floats(1.0))
    (d / "config.json").write_text(json.dumps(config))
    error = _unreadable(d, match)
    assert "config.json" in error.message


def test_a_size_beyond_any_integer(tmp_path):  # was OverflowError
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, (2**70,), (1,))})
    _unreadable(path, "reaches element")


def test_an_unknown_encoding(tmp_path):  # was LookupError: unknown encoding
    obj = {"b": Call("_codecs", "encode", ("x", "no-such-codec"))}
    _unreadable(_pickle_zip(tmp_path, obj), "_codecs.encode")


def test_an_unknown_bytearray_encoding(tmp_path):
    obj = {"b": Call("builtins", "bytearray", ("x", "no-such-codec"))}
    _unreadable(_pickle_zip(tmp_path, obj), "LookupError")


def test_a_storage_key_not_in_the_archive(tmp_path):  # was AssertionError (torch)
    obj = {"w": Tensor(Storage("9", b""), (4,), (1,))}
    path = torch_zip(
        tmp_path / "x.pth", {"w": Tensor(STORAGE, (16,), (1,))}, pickle_bytes=dumps(obj)
    )
    _unreadable(path, "lacks")


def test_a_legacy_storage_key_not_in_the_pickle(tmp_path):  # was AssertionError (torch)
    path = legacy(tmp_path / "l.pth", {"w": Tensor(STORAGE, (16,), (1,))}, keys=["nope"])
    _unreadable(path, "never used")


def test_a_multi_disk_member(tmp_path):  # was BadZipFile
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, (16,), (1,))})
    patch_zip_flags(path, "archive/data.pkl", disk=1)
    _unreadable(path, "multi-disk")


def test_an_encrypted_member(tmp_path):  # was NotImplementedError / RuntimeError
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, (16,), (1,))})
    patch_zip_flags(path, "archive/data.pkl", flags=1)
    _unreadable(path, "encrypted")


def test_a_safetensors_header_that_is_not_utf8(tmp_path):  # was UnicodeDecodeError
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{\xff\xfe}")
    _unreadable(path, "not valid UTF-8 JSON")


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},  # shape != bytes
        {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
        {"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}},
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**70]}},
        {"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}},
        {"w": [1, 2]},
        {"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    ],
)
def test_safetensors_headers_that_lie(tmp_path, header):  # was SafetensorError / TypeError
    _unreadable(safetensors_file(tmp_path / "x.safetensors", header, floats(1.0)), "safetensors|")


def test_a_safetensors_header_length_beyond_the_file(tmp_path):  # was MemoryError
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _unreadable(path, "header of")


def test_a_directory_named_like_a_shard(tmp_path):  # was IsADirectoryError
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").mkdir()
    _unreadable(d, "not a regular file")


def test_a_directory_named_params_json(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    torch_zip(base / "consolidated.00.pth", {"norm.weight": Tensor(STORAGE, (16,), (1,))})
    (base / "params.json").mkdir()
    _unreadable(base, "not a regular file")


def test_a_permission_error_is_unreadable(tmp_path, monkeypatch):  # was PermissionError
    path = torch_zip(tmp_path / "x.pth", {"w": Tensor(STORAGE, (16,), (1,))})

    def denied(*_, **__):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader, "_open_file", denied)
    _unreadable(path, "Permission denied")


def test_huge_ints_in_the_tree_never_reach_repr(tmp_path):  # was ValueError (int digits)
    obj = {"model": {"w": Tensor(STORAGE, (16,), (1,))}, "epoch": 10**5000}
    path = _pickle_zip(tmp_path, obj)
    with open_checkpoint(path) as ckpt:
        assert "bit integer" in ckpt.entries["epoch"].summary
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code in (0, 1), result.output
    json.loads(result.stdout)


def test_a_self_referencing_tree_is_unreadable(tmp_path):  # was RecursionError
    # [L] where L holds itself: APPEND the list to itself through the memo.
    data = b"\x80\x02}X\x05\x00\x00\x00model]q\x00h\x00as."
    _unreadable(torch_zip(tmp_path / "x.pth", None, pickle_bytes=data), "self-referencing")


def test_shared_references_that_multiply_are_unreadable(tmp_path):  # a "billion laughs"
    # L(i+1) = [L(i)] * 10, twelve times: 10^12 paths through 13 small lists.
    levels = b"".join(b"](" + b"h%c" % i * 10 + b"eq%c0" % (i + 1) for i in range(12))
    data = b"\x80\x02}X\x01\x00\x00\x00x]q\x000" + levels + b"h\x0cs."
    _unreadable(torch_zip(tmp_path / "x.pth", None, pickle_bytes=data), "more entries than")


# --------------------------------------------------------------------------- stdout / stderr


def test_diagnose_refusal_is_an_error_line_on_stderr(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    result = runner.invoke(app, ["diagnose", str(empty), "--base", str(WORLD / "base")])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [EMPTY]")
    as_json = runner.invoke(app, ["diagnose", str(empty), "--base", str(WORLD / "base"), "--json"])
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["root_cause"] == "EMPTY"
    assert as_json.stderr.strip().startswith("error [EMPTY]")


def test_nan_inf_and_signaling_nan_values_raise_no_numpy_warnings(tmp_path):
    """The values are the file's; stderr stays free of numpy's RuntimeWarnings (here turned
    into errors, which would end as INTERNAL)."""
    import subprocess
    import sys

    snan = struct.pack("<I", 0x7F800001)
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    a = safetensors_file(tmp_path / "a.safetensors", header, snan + floats(3e38, float("inf"), 1.0))
    b = safetensors_file(tmp_path / "b.safetensors", header, floats(-3e38, 3e38, float("inf"), 2.0))
    base = [sys.executable, "-W", "error::RuntimeWarning", "-m", "ckpt_doctor"]
    root = Path(__file__).resolve().parents[1]
    for args in (["diff", str(a), "--base", str(b)], ["inspect", str(a), "--deep"]):
        proc = subprocess.run([*base, *args], capture_output=True, text=True, cwd=root)
        assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    import warnings

    from ckpt_doctor.numerics import compare, scan_values

    with warnings.catch_warnings(), open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        warnings.simplefilter("error")  # in-process too: no warning is raised at all
        assert scan_values(ca.tensors["w"]).nonfinite == 2
        assert not compare(ca.tensors["w"], cb.tensors["w"]).identical
