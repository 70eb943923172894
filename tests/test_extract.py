"""extract: exact key sets, bit-exact tensors, any layer count, atomic writes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ckpt_doctor import extraction, layouts
from ckpt_doctor.cli import app
from ckpt_doctor.errors import RefusedError, UsageError, WriteError
from ckpt_doctor.extraction import extract
from ckpt_doctor.loading import load_model
from ckpt_doctor.model import ModelArgs, Transformer
from ckpt_doctor.reader import open_checkpoint
from fixtures.make_fixtures import (
    TinyConfig,
    adapter_tensors,
    base_state_dict,
    save_safetensors,
    save_zip,
    training_checkpoint,
    write_meta_dir,
)

CFG = TinyConfig()
runner = CliRunner()


def world(tmp_path: Path, cfg: TinyConfig = CFG, *, drift: bool = False) -> tuple[Path, Path]:
    base = base_state_dict(cfg)
    write_meta_dir(base, tmp_path / "base", cfg)
    model = dict(base)
    if drift:
        model["layers.0.attention.wq.weight"] = model["layers.0.attention.wq.weight"] + 0.5
    ckpt = training_checkpoint(cfg, model, adapter_tensors(cfg))
    return tmp_path / "base", save_zip(ckpt, tmp_path / "checkpoint-4.pth")


def expected_keys(n_layers: int) -> set[str]:
    return {"adapter_query.weight"} | {f"layers.{i}.attention.gate" for i in range(n_layers)}


def test_training_checkpoint_gives_exactly_the_adapter_bit_exact(tmp_path):
    base_dir, ckpt_path = world(tmp_path)
    out = tmp_path / "adapter.pth"
    with open_checkpoint(ckpt_path) as ckpt, open_checkpoint(base_dir) as base:
        result = extract(ckpt, out, base=base)
        source = {k: h.to_torch() for k, h in ckpt.canonical().items()}
    saved = torch.load(out, weights_only=True)
    assert set(saved) == expected_keys(CFG.n_layers) == set(result.taken)
    for name, tensor in saved.items():
        assert tensor.dtype == source[name].dtype and torch.equal(tensor, source[name]), name
    assert result.findings == [] and len(result.left) == 39 and result.exit_code == 0
    assert result.output_bytes < result.input_bytes / 10


def test_output_loads_the_way_upstream_example_py_does(tmp_path):
    """model.load_state_dict(torch.load(adapter), strict=False) must match every key."""
    _, ckpt_path = world(tmp_path)
    out = tmp_path / "adapter.pth"
    with open_checkpoint(ckpt_path) as ckpt:
        extract(ckpt, out)
    fields = ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden", "adapter_len")
    model = Transformer(ModelArgs(**{f: getattr(CFG, f) for f in (*fields, "adapter_layer")}))
    adapter = torch.load(out, weights_only=True)
    result = model.load_state_dict(adapter, strict=False)
    assert result.unexpected_keys == []
    assert set(adapter) <= set(model.state_dict())
    assert torch.equal(model.layers[3].attention.gate.data, adapter["layers.3.attention.gate"])


def test_safetensors_round_trips_with_metadata(tmp_path):
    base_dir, ckpt_path = world(tmp_path)
    out = tmp_path / "adapter.safetensors"
    with open_checkpoint(ckpt_path) as ckpt, open_checkpoint(base_dir) as base:
        result = extract(ckpt, out, base=base)
        source = {k: h.to_torch() for k, h in ckpt.canonical().items()}
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(tensors) == expected_keys(CFG.n_layers)
    assert all(torch.equal(t, source[k]) for k, t in tensors.items())
    assert meta["family"] == "llama-adapter-v1" and meta["gate_fn"] == "tanh"
    assert (meta["adapter_len"], meta["adapter_layer"]) == ("4", "2")
    assert (meta["n_layers"], meta["dim"], meta["n_heads"]) == ("4", "64", "4")
    assert meta["source"] == "checkpoint-4.pth" and meta["tool"].startswith("ckpt-doctor ")
    assert meta["sha256"] == extraction.tensor_digest(tensors) == result.metadata["sha256"]
    with open_checkpoint(out) as reread:  # and ckpt-doctor reads its own metadata back
        assert reread.metadata["adapter_layer"] == "2"


@pytest.mark.parametrize("n_layers", [3, 5, 32])
def test_any_layer_count(tmp_path, n_layers):
    cfg = replace(CFG, n_layers=n_layers, adapter_layer=min(n_layers - 1, 30), dim=32)
    base_dir, ckpt_path = world(tmp_path, cfg)
    out = tmp_path / "adapter.pth"
    with open_checkpoint(ckpt_path) as ckpt, open_checkpoint(base_dir) as base:
        result = extract(ckpt, out, base=base)
    assert set(torch.load(out, weights_only=True)) == expected_keys(n_layers)
    assert result.adapter.adapter_layer == cfg.adapter_layer
    assert result.adapter.adapter_len == cfg.adapter_len


def test_drifted_base_tensor_is_left_and_reported(tmp_path):
    base_dir, ckpt_path = world(tmp_path, drift=True)
    with open_checkpoint(ckpt_path) as ckpt, open_checkpoint(base_dir) as base:
        result = extract(ckpt, tmp_path / "a.pth", base=base)
    assert "layers.0.attention.wq.weight" not in result.taken
    assert [f.id for f in result.findings] == ["BASE_MODIFIED"]
    assert result.exit_code == 1  # a warning
    code = runner.invoke(app, ["extract", str(ckpt_path), "--base", str(base_dir), "-o",
                               str(tmp_path / "b.pth")]).exit_code  # fmt: skip
    assert code == result.exit_code


def test_never_writes_an_empty_file(tmp_path):
    base_dir, _ = world(tmp_path)
    out = tmp_path / "a.pth"
    with open_checkpoint(base_dir) as base, pytest.raises(RefusedError) as info:
        extract(base, out, base=base)
    assert info.value.code == "ADAPTER_MISSING" and not out.exists()


def test_refuses_to_overwrite_without_force_or_an_input(tmp_path):
    _, ckpt_path = world(tmp_path)
    out = tmp_path / "a.pth"
    out.write_bytes(b"keep me")
    with open_checkpoint(ckpt_path) as ckpt:
        with pytest.raises(UsageError, match="already exists"):
            extract(ckpt, out)
        assert out.read_bytes() == b"keep me"
        with pytest.raises(UsageError, match="inputs"):
            extract(ckpt, ckpt_path, force=True)
        extract(ckpt, out, force=True)
    assert set(torch.load(out, weights_only=True)) == expected_keys(CFG.n_layers)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_failure_mid_write_leaves_no_output_and_input_untouched(tmp_path, monkeypatch, fmt):
    _, ckpt_path = world(tmp_path)
    before = digest(ckpt_path)
    out = tmp_path / f"a.{fmt}"
    real_save = layouts._save

    def crash(obj, path, fmt_, metadata):
        real_save(obj, path, fmt_, metadata)  # bytes are on disk, then the crash comes
        raise OSError("disk full")

    monkeypatch.setattr(layouts, "_save", crash)
    # The environment's failure is a WriteError (exit 2, one line) naming the output.
    with open_checkpoint(ckpt_path) as ckpt, pytest.raises(WriteError, match="disk full"):
        extract(ckpt, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert digest(ckpt_path) == before


def test_cli_extract_json(tmp_path):
    base_dir, ckpt_path = world(tmp_path)
    out = tmp_path / "a.safetensors"
    result = runner.invoke(
        app, ["extract", str(ckpt_path), "--base", str(base_dir), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["taken"]) == expected_keys(CFG.n_layers) and doc["findings"] == []
    again = runner.invoke(app, ["extract", str(ckpt_path), "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr


def run_verify(adapter: Path, base_dir: Path, full: Path | None) -> dict:
    args = ["verify", str(adapter), "--base", str(base_dir), "--json"]
    result = runner.invoke(app, [*args, *(["--full", str(full)] if full else [])])
    assert result.exit_code in (0, 1), result.output
    return {"code": result.exit_code, **json.loads(result.stdout)}


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_verify_passes_on_a_fresh_extraction(tmp_path, suffix):
    base_dir, ckpt_path = world(tmp_path)
    out = tmp_path / f"adapter.{suffix}"
    with open_checkpoint(ckpt_path) as ckpt, open_checkpoint(base_dir) as base:
        extract(ckpt, out, base=base)
    doc = run_verify(out, base_dir, ckpt_path)
    assert doc["code"] == 0 and doc["passed"] and doc["max_logit_diff"] == 0.0
    checks = {c["name"]: c["passed"] for c in doc["checks"]}
    names = ["reload", "upstream load", "values", "bit-exact", "complete", "strict load"]
    assert checks == dict.fromkeys([*names, "same logits"], True)
    assert doc["findings"] == []


def extracted_world(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The world's base and checkpoint, and its adapter extracted and loaded back."""
    base_dir, ckpt_path = world(tmp_path)
    out = tmp_path / "adapter.pth"
    with open_checkpoint(ckpt_path) as ckpt:
        extract(ckpt, out)
    return base_dir, ckpt_path, torch.load(out, weights_only=True)


def test_verify_catches_a_tampered_and_an_incomplete_adapter(tmp_path):
    base_dir, ckpt_path, adapter = extracted_world(tmp_path)
    adapter["layers.3.attention.gate"] = adapter["layers.3.attention.gate"] + 1e-3
    torch.save(adapter, tmp_path / "tampered.pth")
    del adapter["adapter_query.weight"]
    torch.save(adapter, tmp_path / "incomplete.pth")
    tampered = run_verify(tmp_path / "tampered.pth", base_dir, ckpt_path)
    checks = {c["name"]: c for c in tampered["checks"]}
    assert tampered["code"] == 1 and not checks["bit-exact"]["passed"]
    assert not checks["same logits"]["passed"]
    # every failed check comes with its finding; details name only what is there
    assert {"NOT_BIT_EXACT", "LOGITS_DIFFER"} <= finding_ids(tampered)
    assert checks["bit-exact"]["detail"] == "differ: layers.3.attention.gate"
    incomplete = run_verify(tmp_path / "incomplete.pth", base_dir, ckpt_path)
    checks = {c["name"]: c["passed"] for c in incomplete["checks"]}
    assert incomplete["code"] == 1 and not checks["complete"]
    assert "ADAPTER_MISSING" in finding_ids(incomplete)
    for doc in (tampered, incomplete):
        assert all(f["severity"] == "error" for f in doc["findings"])


def finding_ids(doc: dict) -> set[str]:
    return {f["id"] for f in doc["findings"]}


def test_verify_fails_a_file_upstream_would_load_nothing_from(tmp_path):
    """The training checkpoint (weights under 'model') and a nested, prefixed adapter resolve
    fine for ckpt-doctor, but upstream's load_state_dict(strict=False) takes nothing."""
    base_dir, ckpt_path = world(tmp_path)
    doc = run_verify(ckpt_path, base_dir, None)
    checks = {c["name"]: c["passed"] for c in doc["checks"]}
    assert doc["code"] == 1 and not doc["passed"] and not checks["upstream load"]
    assert {"CONTAINER_NESTED", "LOAD_NOTHING"} <= finding_ids(doc)
    with open_checkpoint(ckpt_path) as ckpt:
        adapter = {k: h.to_torch().clone() for k, h in ckpt.canonical().items() if "gate" in k}
        adapter["adapter_query.weight"] = ckpt.canonical()["adapter_query.weight"].to_torch()
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in adapter.items()}}, nested)
    doc = run_verify(nested, base_dir, ckpt_path)
    checks = {c["name"]: c["passed"] for c in doc["checks"]}
    assert doc["code"] == 1 and not checks["upstream load"]
    assert checks["bit-exact"] and checks["strict load"]  # only upstream's view is wrong
    assert {"LOAD_NOTHING", "KEY_PREFIX"} <= finding_ids(doc)
    flat = tmp_path / "flat.pth"
    torch.save(adapter, flat)
    doc = run_verify(flat, base_dir, ckpt_path)
    assert doc["code"] == 0 and doc["passed"] and doc["findings"] == []


def test_verify_reports_a_sha256_mismatch(tmp_path):
    base_dir, ckpt_path = world(tmp_path)
    out = tmp_path / "adapter.safetensors"
    with open_checkpoint(ckpt_path) as ckpt:
        result = extract(ckpt, out)
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["layers.3.attention.gate"] += 1e-3
    tampered = save_safetensors(
        tensors, tmp_path / "tampered.safetensors", metadata=result.metadata
    )
    doc = run_verify(tampered, base_dir, None)
    checks = {c["name"]: c["passed"] for c in doc["checks"]}
    assert doc["code"] == 1 and not checks["reload"]
    assert finding_ids(doc) == {"SHA256_MISMATCH"}


def test_verify_checks_the_values(tmp_path):
    base_dir, _, adapter = extracted_world(tmp_path)
    adapter["adapter_query.weight"][0, 0] = float("nan")
    torch.save(adapter, tmp_path / "nan.pth")
    doc = run_verify(tmp_path / "nan.pth", base_dir, None)
    checks = {c["name"]: c["passed"] for c in doc["checks"]}
    assert doc["code"] == 1 and not doc["passed"] and not checks["values"]
    assert finding_ids(doc) == {"NONFINITE"}
    human = runner.invoke(app, ["verify", str(tmp_path / "nan.pth"), "--base", str(base_dir)])
    assert human.exit_code == 1 and "verification failed" in human.stdout


def test_verify_counts_scalar_gates_as_inspect_does(tmp_path):
    """One GATE_SHAPE finding, with inspect's count (the adapted layers' gates)."""
    base_dir, _, adapter = world_with(tmp_path, scalar_gates=True)
    path = tmp_path / "scalar.pth"
    torch.save(adapter, path)
    doc = run_verify(path, base_dir, None)
    (shape,) = [f for f in doc["findings"] if f["id"] == "GATE_SHAPE"]
    inspected = runner.invoke(app, ["inspect", str(path), "--base", str(base_dir), "--json"])
    (expected,) = [f for f in json.loads(inspected.stdout)["findings"] if f["id"] == "GATE_SHAPE"]
    assert shape["message"] == expected["message"]
    assert "2 of the 2 adapted layers' gates" in shape["message"]
    checks = {c["name"]: c["passed"] for c in doc["checks"]}
    assert doc["code"] == 1 and not checks["upstream load"] and not checks["values"]


def test_verify_explains_a_drifted_base(tmp_path):
    base_dir, ckpt_path = world(tmp_path, drift=True)
    out = tmp_path / "adapter.pth"
    with open_checkpoint(ckpt_path) as ckpt, open_checkpoint(base_dir) as base:
        extract(ckpt, out, base=base)
    doc = run_verify(out, base_dir, ckpt_path)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["complete"]["passed"] and "drifted" in checks["complete"]["detail"]
    assert not checks["same logits"]["passed"]
    assert "BASE_MODIFIED" in checks["same logits"]["detail"]
    assert doc["code"] == 1 and doc["max_logit_diff"] > 0


def world_with(tmp_path: Path, **adapter_options) -> tuple[Path, Path, dict]:
    """The tiny world with an adapter the caller edits; returns (base dir, ckpt, adapter)."""
    base = base_state_dict(CFG)
    write_meta_dir(base, tmp_path / "base", CFG)
    return tmp_path / "base", tmp_path / "checkpoint-4.pth", adapter_tensors(CFG, **adapter_options)


def save_world(ckpt_path: Path, adapter: dict) -> Path:
    return save_zip(training_checkpoint(CFG, base_state_dict(CFG), adapter), ckpt_path)


def cli_extract(ckpt: Path, base_dir: Path, out: Path, *extra: str):
    args = ["extract", str(ckpt), "--base", str(base_dir), "-o", str(out), *extra, "--json"]
    return runner.invoke(app, args)


@pytest.mark.parametrize(
    ("case", "expected"),
    [("nan", "NONFINITE"), ("zero_gates", "ADAPTER_INERT"), ("scalar_gates", "GATE_SHAPE")],
)
def test_extract_checks_the_content_it_takes(tmp_path, case, expected):
    """A NaN, inert or legacy-gated adapter is extracted as asked, but reported (exit 1)."""
    base_dir, ckpt_path, adapter = world_with(tmp_path, scalar_gates=case == "scalar_gates")
    if case == "nan":
        adapter["adapter_query.weight"][0, 0] = float("nan")
    if case == "zero_gates":
        adapter = {k: v.zero_() if k.endswith(".gate") else v for k, v in adapter.items()}
    save_world(ckpt_path, adapter)
    out = tmp_path / "adapter.pth"
    result = cli_extract(ckpt_path, base_dir, out)
    assert result.exit_code == 1, result.output
    found = {f["id"]: f["severity"] for f in json.loads(result.stdout)["findings"]}
    assert found == {expected: "error"}
    assert out.is_file()


def test_extract_dtype_accepts_floats_only(tmp_path):
    _, ckpt_path = world(tmp_path)
    out = tmp_path / "a.pth"
    result = runner.invoke(app, ["extract", str(ckpt_path), "-o", str(out), "--dtype", "int8"])
    assert result.exit_code == 2  # a choice: click refuses int8 and lists what --dtype takes
    assert "'int8' is not one of" in result.stderr and "float16" in result.stderr
    assert not out.exists()
    with open_checkpoint(ckpt_path) as ckpt, pytest.raises(UsageError):
        extract(ckpt, out, dtype="float8_e4m3fn")
    assert not out.exists()


def test_extract_refuses_a_cast_that_overflows(tmp_path):
    base_dir, ckpt_path, adapter = world_with(tmp_path)
    adapter["adapter_query.weight"][1, 2] = 70000.0  # finite in fp32, Inf in fp16
    save_world(ckpt_path, adapter)
    out = tmp_path / "a.pth"
    with open_checkpoint(ckpt_path) as ckpt, pytest.raises(RefusedError) as info:
        extract(ckpt, out, dtype="float16")
    assert info.value.code == "FP16_OVERFLOW" and info.value.exit_code == 2
    assert "70000" in info.value.message and "--dtype" in info.value.hint
    assert not out.exists()
    result = cli_extract(ckpt_path, base_dir, out, "--dtype", "float16")
    assert result.exit_code == 2 and not out.exists()
    # bfloat16 has the range: written, and the overflow is reported for fp16 inference
    result = cli_extract(ckpt_path, base_dir, out, "--dtype", "bfloat16")
    assert result.exit_code == 1, result.output
    assert [f["id"] for f in json.loads(result.stdout)["findings"]] == ["FP16_OVERFLOW"]
    written = torch.load(out, weights_only=True)["adapter_query.weight"]
    assert written.dtype == torch.bfloat16 and torch.isfinite(written).all()


def test_verify_against_a_base_of_another_size_fails_the_load_check(tmp_path):
    """A ModelLoadError in the strict load is a failed check with its finding, not an abort."""
    _, ckpt_path, adapter = extracted_world(tmp_path)
    torch.save(adapter, tmp_path / "adapter.pth")
    other = replace(CFG, dim=32)
    write_meta_dir(base_state_dict(other), tmp_path / "other-base", other)
    doc = run_verify(tmp_path / "adapter.pth", tmp_path / "other-base", ckpt_path)
    checks = {c["name"]: c for c in doc["checks"]}
    assert doc["code"] == 1 and not doc["passed"]
    load = checks["strict load"]
    assert not load["passed"] and "adapter_query.weight" in load["detail"]
    (f,) = [f for f in doc["findings"] if f["evidence"].get("check") == "strict load"]
    assert f["severity"] == "error" and f["id"] == "ADAPTER_SHAPE" and f["hint"]
    assert f["id"] in load["detail"]
    logits = checks["same logits"]
    assert not logits["passed"] and logits["detail"].startswith("not run")
    human = runner.invoke(app, ["verify", str(tmp_path / "adapter.pth"), "--base",
                                str(tmp_path / "other-base")])  # fmt: skip
    assert human.exit_code == 1 and "strict load" in human.stdout


def test_verify_with_a_full_checkpoint_that_does_not_load_fails_same_logits(tmp_path):
    base_dir, ckpt_path, adapter = extracted_world(tmp_path)
    torch.save(adapter, tmp_path / "adapter.pth")
    with open_checkpoint(ckpt_path) as ckpt:
        model = {k: h.to_torch().clone() for k, h in ckpt.canonical().items()}
    emb = model["tok_embeddings.weight"]
    model["tok_embeddings.weight"] = torch.cat([emb, emb[:2]])  # a resized vocabulary
    full = save_zip(model, tmp_path / "resized.pth")
    doc = run_verify(tmp_path / "adapter.pth", base_dir, full)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["strict load"]["passed"] and doc["code"] == 1
    assert not checks["same logits"]["passed"] and "not run" in checks["same logits"]["detail"]
    assert any(
        f["id"] == "VOCAB_MISMATCH" and f["evidence"].get("check") == "same logits"
        for f in doc["findings"]
    )


def test_verify_exit_code_is_the_findings_rule_plus_failed_checks():
    from ckpt_doctor.findings import finding
    from ckpt_doctor.verification import Check, VerifyReport

    ok, failed = Check("a", True, ""), Check("b", False, "")
    info, warning = finding("OPTIMIZER_STATE", "m", "h"), finding("BASE_MODIFIED", "m", "h")
    assert VerifyReport([ok], [info]).exit_code == 0
    assert VerifyReport([ok], [warning]).exit_code == 1
    assert VerifyReport([ok, failed], [info]).exit_code == 1


@pytest.mark.parametrize(
    ("name", "fmt"), [("adapter.pth", "safetensors"), ("a.safetensors", "pth")]
)
def test_format_and_file_name_must_agree(tmp_path, name, fmt):
    """torch.load cannot read safetensors bytes named .pth (nor safe_open a pickle): refused
    before anything is written."""
    _, ckpt_path = world(tmp_path)
    out = tmp_path / name
    with open_checkpoint(ckpt_path) as ckpt, pytest.raises(UsageError, match=f"--format {fmt}"):
        extract(ckpt, out, fmt=fmt)
    assert not out.exists()


def _cli(*args: object) -> int:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code


@pytest.mark.parametrize("chain", ["cast", "bake", "broadcast"])
def test_verify_redoes_the_transforms_the_file_records(tmp_path, chain):
    """extract --dtype, repair --bake-tanh and repair's gate broadcast write files that are not
    their source bit for bit; their metadata says why, and verify applies the same transforms
    to --full before comparing: the tool's own output verifies clean, tensors and logits."""
    base_dir, ckpt_path, adapter = world_with(tmp_path, scalar_gates=chain == "broadcast")
    save_world(ckpt_path, adapter)
    extracted = tmp_path / "adapter.safetensors"
    cast = ["--dtype", "bfloat16"] if chain == "cast" else []
    _cli("extract", ckpt_path, "--base", base_dir, "-o", extracted, *cast)
    out = extracted
    if chain != "cast":
        out = tmp_path / "repaired.safetensors"
        extra = ["--bake-tanh"] if chain == "bake" else ["--base", base_dir]
        _cli("repair", extracted, "-o", out, *extra)
    doc = run_verify(out, base_dir, ckpt_path)
    checks = {c["name"]: c for c in doc["checks"]}
    assert doc["code"] == 0 and doc["passed"] and doc["findings"] == [], doc
    assert "as transformed" in checks["bit-exact"]["detail"]
    assert doc["max_logit_diff"] == 0.0  # bit for bit against the transformed --full


def test_verify_does_not_excuse_an_unrecorded_transform(tmp_path):
    """A .pth cannot record the bake: its gates are then simply not the source's."""
    base_dir, ckpt_path = world(tmp_path)
    extracted, baked = tmp_path / "adapter.pth", tmp_path / "baked.pth"
    _cli("extract", ckpt_path, "-o", extracted)
    _cli("repair", extracted, "--bake-tanh", "-o", baked)
    doc = run_verify(baked, base_dir, ckpt_path)
    assert doc["code"] == 1 and "NOT_BIT_EXACT" in finding_ids(doc)


def test_baked_gates_refuse_a_second_tanh_at_load(tmp_path):
    base_dir, ckpt_path = world(tmp_path)
    extracted, baked = tmp_path / "adapter.safetensors", tmp_path / "baked.safetensors"
    _cli("extract", ckpt_path, "-o", extracted)
    _cli("repair", extracted, "--bake-tanh", "-o", baked)
    with open_checkpoint(base_dir) as base, open_checkpoint(baked) as adapter:
        with pytest.raises(UsageError, match="apply it twice"):
            load_model(base, adapter=adapter, gate_fn="tanh")
        load_model(base, adapter=adapter, gate_fn="raw")  # what the bake is for
