"""Property-based fuzzing (hypothesis) of the pickle scanner, the torch-zip reader, the
safetensors header parser and the directory readers.

Deterministic (derandomize) and bounded (max_examples) so the whole file runs in about a
minute in CI. The properties: a reader either refuses with a typed error or returns handles
whose every value lies inside what the file stores; the scanner never lets through a global
the unpickler would then import; a directory reader opens nothing outside the directory.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_doctor.errors import CkptDoctorError, UnreadableError, UnsafePickleError
from ckpt_doctor.inspection import inspect_checkpoint
from ckpt_doctor.pickle_scan import _qualname, check_pickle, is_allowed
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.safetensors_format import read_header
from tests.hostile_files import Storage, Tensor, floats, safetensors_file, torch_zip

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny" / "checkpoint-4.pth"


# --------------------------------------------------------------------------- pickle scanner

_NAMES = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("os", "system"),
    ("builtins", "eval"),
    ("__builtin__", "set"),
    ("torch.serialization", "os.system"),
    ("posix", "system"),
]


def _short(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


_OPS = st.one_of(
    st.sampled_from(_NAMES).map(lambda n: b"c" + f"{n[0]}\n{n[1]}\n".encode()),
    st.sampled_from([m for n in _NAMES for m in n]).map(_short),
    st.sampled_from([b"\x93", b"\x94", b"(", b"t", b")", b"R", b"0", b"2", b"}", b"]", b"e"]),
    st.sampled_from([b"s", b"u", b"N", b"\x85", b"\x86", b"a", b"b", b"l", b"d", b"1"]),
    st.integers(0, 6).map(lambda i: b"q" + bytes([i])),  # BINPUT
    st.integers(0, 6).map(lambda i: b"h" + bytes([i])),  # BINGET
    st.integers(0, 255).map(lambda i: b"K" + bytes([i])),  # BININT1
    st.binary(max_size=3),
)


class _Recorder(pickle.Unpickler):
    """The real unpickler, with every global it asks for recorded and replaced by a stub."""

    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.asked: list[str] = []
        self.proto = 0

    def find_class(self, module: str, name: str) -> object:
        self.asked.append(_qualname(module, name, self.proto))
        return lambda *a, **k: None

    def persistent_load(self, pid: object) -> None:
        return None


@settings(FUZZ, max_examples=800)
@given(body=st.lists(_OPS, max_size=40), proto=st.sampled_from([0, 2, 4]))
def test_scanner_never_lets_through_what_the_unpickler_imports(tmp_path_factory, body, proto):
    data = (b"\x80" + bytes([proto]) if proto else b"") + b"".join(body) + b"."
    path = tmp_path_factory.mktemp("p") / "x.pkl"
    path.write_bytes(data)
    try:
        found = check_pickle(path)
    except (UnreadableError, UnsafePickleError):
        return
    recorder = _Recorder(data)
    recorder.proto = proto
    with contextlib.suppress(Exception):  # only the names it asked for matter
        recorder.load()
    assert set(recorder.asked) <= set(found)
    assert all(is_allowed(n) for n in recorder.asked)


@FUZZ
@given(data=st.binary(max_size=300))
def test_scanner_on_arbitrary_bytes_refuses_or_lists(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "x.pt"
    path.write_bytes(data)
    with contextlib.suppress(UnreadableError):
        assert isinstance(check_pickle(path, trust=True), list)


# --------------------------------------------------------------------------- torch zip reader

_DIM = st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**31, 2**40, 2**63]))
_STRIDE = st.one_of(st.integers(-2, 20), st.sampled_from([2**40, -(2**40), 2**62]))
_ODD = st.sampled_from([4.0, None, "4", True])


@FUZZ
@given(
    size=st.lists(st.one_of(_DIM, _ODD), max_size=3),
    stride=st.lists(st.one_of(_STRIDE, _ODD), max_size=3),
    offset=st.one_of(st.integers(-2, 20), st.sampled_from([2**40, 4.0])),
)
def test_zip_views_are_inside_their_storage_or_refused(tmp_path_factory, size, stride, offset):
    storage = Storage("0", floats(*range(16)))
    path = tmp_path_factory.mktemp("z") / "x.pth"
    torch_zip(path, {"w": Tensor(storage, tuple(size), tuple(stride), offset)})
    try:
        ckpt = open_checkpoint(path)
    except UnreadableError:
        return
    arr = ckpt.tensors["w"].array()
    # Every element is the stored value at offset + sum(index * stride): inside 0..15.
    for index in np.ndindex(*arr.shape):
        at = offset + sum(i * s for i, s in zip(index, stride, strict=True))
        assert 0 <= at < 16 and arr[index] == at
    assert np.array_equal(ckpt.tensors["w"].to_torch().numpy(), arr)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), min_size=1, max_size=8))
def test_a_bit_flipped_checkpoint_is_read_or_refused(tmp_path_factory, flips):
    data = bytearray(FIXTURE.read_bytes())
    for at, bit in flips:
        data[at % len(data)] ^= 1 << bit
    path = tmp_path_factory.mktemp("f") / "x.pth"
    path.write_bytes(bytes(data))
    try:
        with open_checkpoint(path) as ckpt:
            inspect_checkpoint(ckpt, deep=True)
    except CkptDoctorError:
        pass


# --------------------------------------------------------------------------- safetensors

_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "U8", "BF16", "I64", "F8_E8M0", 3]),
        "shape": st.one_of(st.lists(st.integers(-1, 6), max_size=3), _ODD),
        "data_offsets": st.one_of(st.lists(st.integers(-1, 300), min_size=2, max_size=2), _ODD),
    }
)


@FUZZ
@given(
    header=st.dictionaries(
        st.sampled_from(["a", "b", "layers.9.x", "__metadata__"]), _ENTRY, max_size=3
    ),
    data_len=st.integers(0, 300),
)
def test_safetensors_headers_are_checked_against_the_bytes(tmp_path_factory, header, data_len):
    path = tmp_path_factory.mktemp("s") / "x.safetensors"
    data = bytes(range(256)) * 2
    safetensors_file(path, header, data[:data_len])
    try:
        entries, _, start = read_header(path, path.stat().st_size)
        ckpt = open_checkpoint(path)
    except UnreadableError:
        return
    raw = path.read_bytes()
    for name, info in entries.items():
        lo, hi = info["data_offsets"]
        got = ckpt.tensors[name].array()
        assert got.tobytes() == raw[start + lo : start + hi]


# --------------------------------------------------------------------------- directories

_PATHS = st.sampled_from(
    [
        *("model.safetensors", "../outside.safetensors", "/etc/passwd", "sub/../model.safetensors"),
        *("", ".", "link.safetensors", "a/../../x", "model.safetensors\x00"),
    ]
)
_JSON = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    targets=st.lists(_PATHS, min_size=1, max_size=3),
    config=st.one_of(
        _JSON, st.fixed_dictionaries({"num_hidden_layers": _JSON, "hidden_size": _JSON})
    ),
)
def test_directory_readers_stay_inside(tmp_path_factory, targets, config):
    root = tmp_path_factory.mktemp("d")
    d = root / "hf"
    d.mkdir()
    header = {"model.norm.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    safetensors_file(d / "model.safetensors", header, floats(1.0))
    safetensors_file(root / "outside.safetensors", header, floats(2.0))
    (d / "link.safetensors").symlink_to(root / "outside.safetensors")
    weight_map = {
        "model.norm.weight": targets[0],
        **{f"x{i}": t for i, t in enumerate(targets[1:])},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(config))
    try:
        ckpt = open_checkpoint(d)
    except UnreadableError as exc:
        assert "2.0" not in exc.message
        return
    inside = d.resolve()
    assert all(p.resolve().is_relative_to(inside) for p in ckpt.read_files)
    assert ckpt.tensors["model.norm.weight"].values().tolist() == [1.0]


def test_the_properties_ran_deterministically():
    """derandomize=True: the same examples on every run (and CI)."""
    assert FUZZ.derandomize and FUZZ.deadline is None and FUZZ.database is None
