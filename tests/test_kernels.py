"""Fused gated-attention kernels against the PyTorch reference: in Triton's CPU interpreter,
or compiled on a GPU.

conftest.py sets TRITON_INTERPRET=1 before anything imports Triton (fp32 and fp16 only: the
interpreter's bf16 is wrong). With CKPT_DOCTOR_GPU_TESTS=1 on a machine with CUDA it does not,
and the same cases run compiled on CUDA tensors, bf16 added (benchmarks/run_gpu.sh runs them
first). The accuracy criterion: against an fp64 oracle, the kernel's max error is at most 2x
the max error of the reference run in the same precision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_doctor.kernels import (
    KernelInputError,
    fused_unavailable_reason,
    gated_attention,
    gated_attention_reference,
    interpreting,
    per_head_gate,
)
from typer.testing import CliRunner

from ckpt_doctor.cli import app
from ckpt_doctor.errors import UsageError
from ckpt_doctor.smoke import resolve_attention
from tests.kernel_marks import DEVICE, DTYPE_IDS, DTYPES, GPU, MARKS

triton = pytest.importorskip("triton", reason="pip install 'ckpt-doctor[triton]'")
pytestmark = MARKS

H, HD, LA = 3, 48, 10  # head_dim 48 and adapter_len 10 are not block multiples
GATES = {"zero": [0.0], "0.37": [0.37], "-1.5": [-1.5], "per-head": [0.5, -0.8, 1.7]}


def case(
    b: int, t: int, start: int, dtype: torch.dtype, *, h: int = H, seed: int = 0, device=DEVICE
) -> dict[str, torch.Tensor]:
    """Inputs in fp64 (the oracle's) on ``device``; cache positions past start+T hold NaN, so
    a kernel that reads a future position (or one past the cache) poisons its output."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    length = start + t + 5
    k, v = rnd(b, h, length, HD), rnd(b, h, length, HD)
    k[:, :, start + t :] = float("nan")
    v[:, :, start + t :] = float("nan")
    x = {"q": rnd(b, h, t, HD) * 2, "k": k, "v": v, "ak": rnd(h, LA, HD), "av": rnd(h, LA, HD)}
    return {n: a.to(device) for n, a in x.items()}


def run(fn, x: dict, dtype: torch.dtype, gate: torch.Tensor | None, start: int) -> torch.Tensor:
    cast = {n: t.to(dtype) for n, t in x.items()}
    adapter = {}
    if gate is not None:
        adapter = {"adapter_k": cast["ak"], "adapter_v": cast["av"], "gate": gate}
    return fn(cast["q"], cast["k"], cast["v"], start=start, **adapter)


def errors(x: dict, dtype: torch.dtype, gate: torch.Tensor | None, start: int) -> tuple:
    oracle = run(gated_attention_reference, x, torch.float64, gate, start)
    ref = run(gated_attention_reference, x, dtype, gate, start)
    fused = run(gated_attention, x, dtype, gate, start)
    assert fused.dtype == dtype and fused.shape == oracle.shape
    assert torch.isfinite(fused).all()
    return (fused.double() - oracle).abs().max().item(), (ref.double() - oracle).abs().max().item()


SHAPES = [  # (batch, new tokens, start): prefill from 0 and after a prefix, decode
    pytest.param(2, 37, 0, id="prefill-T37"),
    pytest.param(2, 5, 11, id="prefill-T5-start11"),
    pytest.param(1, 20, 70, id="prefill-T20-start70"),
    pytest.param(2, 1, 0, id="decode-start0"),
    pytest.param(2, 1, 75, id="decode-start75"),
    pytest.param(1, 1, 300, id="decode-start300"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gate", list(GATES), ids=list(GATES))
@pytest.mark.parametrize(("b", "t", "start"), SHAPES)
def test_fused_matches_reference(b: int, t: int, start: int, gate: str, dtype: torch.dtype):
    x = case(b, t, start, dtype)
    g = per_head_gate(torch.tensor(GATES[gate], device=DEVICE), H, gate_fn="raw")
    fused_err, ref_err = errors(x, dtype, g, start)
    assert fused_err <= 2 * ref_err, (fused_err, ref_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("b", "t", "start"), SHAPES)
def test_without_adapter_is_causal_attention(b: int, t: int, start: int, dtype: torch.dtype):
    x = case(b, t, start, dtype, seed=1)
    fused_err, ref_err = errors(x, dtype, None, start)
    assert fused_err <= 2 * ref_err, (fused_err, ref_err)


@pytest.mark.parametrize(("b", "t", "start"), [(2, 9, 3), (2, 1, 40)], ids=["prefill", "decode"])
def test_gate_zero_is_exactly_plain_causal_attention(b: int, t: int, start: int):
    x = case(b, t, start, torch.float32, seed=2)
    zero = per_head_gate(torch.zeros(1, device=DEVICE), H, gate_fn="tanh")
    gated = run(gated_attention, x, torch.float32, zero, start)
    plain = run(gated_attention, x, torch.float32, None, start)
    assert torch.equal(gated, plain)


def test_tanh_gate_and_scalar_broadcast():
    assert torch.equal(per_head_gate(torch.tensor([0.5]), 3, gate_fn="raw"), torch.full((3,), 0.5))
    tanh = per_head_gate(torch.tensor([[[[0.5]], [[-2.0]]]]), 2, gate_fn="tanh")
    assert torch.allclose(tanh, torch.tensor([0.5, -2.0]).tanh())
    assert tanh.dtype == torch.float32 and tanh.shape == (2,)
    with pytest.raises(KernelInputError, match="3 values for 2 heads"):
        per_head_gate(torch.zeros(3), 2, gate_fn="raw")


def test_bad_inputs_raise_typed_errors():
    x = {n: t.float() for n, t in case(1, 4, 0, torch.float32).items()}
    g = torch.zeros(H, device=DEVICE)
    bad = [
        ({"q": x["q"][0]}, "q must be"),
        ({"k": x["k"][:, :, :2]}, "cache holds 2 positions"),
        ({"v": x["v"].half()}, "v: dtype/device differ"),
        ({"ak": x["ak"][:, :, :8]}, "adapter_k is"),
        ({"ak": x["ak"][0, 0]}, "adapter_k is"),  # wrong rank: typed, not an IndexError
        ({"gate": torch.zeros(H, dtype=torch.float64, device=DEVICE)}, "gate must be fp32"),
        ({"gate": torch.zeros(H + 1, device=DEVICE)}, "gate must be fp32"),
        ({n: x[n].expand(65536, -1, -1, -1) for n in "qkv"}, "batch 65536"),
    ]
    for change, message in bad:
        y = {**x, "gate": g, **change}
        with pytest.raises(KernelInputError, match=message) as err:
            gated_attention(
                y["q"],
                y["k"],
                y["v"],
                start=0,
                adapter_k=y["ak"],
                adapter_v=y["av"],
                gate=y["gate"],
            )
        assert err.value.hint
    with pytest.raises(KernelInputError, match="go together"):
        gated_attention(x["q"], x["k"], x["v"], start=0, gate=g)


def test_fused_refused_on_cpu_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = fused_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    x = case(1, 3, 0, torch.float32, device="cpu")
    with pytest.raises(KernelInputError, match="cannot run"):
        run(gated_attention, x, torch.float32, None, 0)


def test_ahead_of_time_compile_for_sm80_and_sm90a(tmp_path):
    """The whole GPU pipeline down to a cubin, for every kernel and prefill config (no GPU);
    an empty Triton cache, so that every kernel is really compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "ckpt_doctor.kernels.aot", "--arch", "80", "90"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]  # 1: shared memory too big
    lines = done.stdout.splitlines()
    assert sum("pos in memory" in ln for ln in lines) == 6  # the CUDA-graph decode, 3 dtypes x 2
    for arch in ("sm_80 ", "sm_90a"):
        kernels = ("gated_prefill_kernel", "decode_partial_kernel", "decode_combine_kernel")
        kernels += ("add_rmsnorm_kernel", "swiglu_kernel", "rope_cache_kernel")  # fused.py
        for kernel in kernels:
            for dtype in ("fp16", "bf16", "fp32"):
                assert any(kernel in ln and arch in ln and dtype in ln for ln in lines), (
                    kernel,
                    arch,
                    dtype,
                )


WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"


def test_smoke_generate_fused_matches_reference_on_the_fixture_world(one_thread):
    """The model dispatch end to end: the world's full checkpoint, fused vs reference attention,
    through the CLI: same tokens, same outcomes, and the JSON says which path ran."""
    prompts = json.loads((WORLD / "prompts.json").read_text())["held_out"][:3]
    docs = {}
    for attention in ("reference", "fused"):
        args = ["smoke-generate", "--base", str(WORLD / "base"), "--full"]
        args += [str(WORLD / "checkpoint-4.pth"), "--attention", attention, "--json"]
        args += ["--max-new-tokens", "24", *(a for p in prompts for a in ("--prompt", p))]
        args += ["--device", DEVICE] + (["--no-cuda-graph"] if attention == "fused" else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (0, 1), result.output
        docs[attention] = json.loads(result.stdout)
        assert docs[attention]["attention"] == attention
        assert docs[attention]["cuda_graph"] is (GPU and attention == "reference")
    for ref, fused in zip(docs["reference"]["results"], docs["fused"]["results"], strict=True):
        assert fused["generated_ids"] == ref["generated_ids"]
        assert fused["outcome"] == ref["outcome"]


def test_attention_auto_is_reference_on_cpu_and_fused_is_refused_there(monkeypatch):
    assert resolve_attention("auto", torch.device("cpu")) == "reference"
    if interpreting():
        assert resolve_attention("fused", torch.device("cpu")) == "fused"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="--attention fused cannot run") as err:
        resolve_attention("fused", torch.device("cpu"))
    assert "--attention reference" in err.value.hint
    result = CliRunner().invoke(
        app, ["smoke-generate", "--base", str(WORLD / "base"), "--attention", "fused"]
    )
    assert result.exit_code == 2
    assert "--attention fused cannot run" in result.stderr


@pytest.mark.skipif(GPU, reason="on a GPU, run_gpu.sh is what runs these tests")
def test_gpu_benchmark_script_runs_dry_on_the_cpu(tmp_path):
    """benchmarks/run_gpu.sh (the package laid out as a wheel installs it, then
    attention_gpu.py and time_to_verdict.py) at toy shapes in the interpreter: the GPU run
    works before GPU time is spent on it, and its correctness rows pass, the CUDA-graph decode's
    too; every row of every table is there."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:"
           f"{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    cmd = ["bash", "benchmarks/run_gpu.sh", "--dry-run"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert log.startswith("torch ") and "exit" not in log, log[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    keys = {"correctness", "prefill", "decode", "decode_splits", "end_to_end", "targets"}
    assert keys <= result.keys()
    assert result["correctness"] and all(row["pass"] for row in result["correctness"])
    assert any("position in memory" in row["case"] for row in result["correctness"])
    assert all("fused us" in r and "fused us eager" in r for r in result["decode"])
    e2e = result["end_to_end"]
    for label in ("reference", "fused attention only", "fused", "fused + CUDA graph"):
        assert e2e[f"B=1 {label} tok/s"] > 0, e2e
    assert e2e["B=1 generate() tok/s"] > 0
    assert e2e["B=1 fused + CUDA graph same tokens as fused"] == 1.0
    assert [row["batch"] for row in e2e["batches"]] == [1, 2]
    assert all("HF+PEFT" in k for row in e2e["batches"] for k in row if "HF" in k)
    assert {p["setup"] for p in e2e["profile"]} == {"all fused", "fused attention only"}
    assert all("error" not in p for p in e2e["profile"])
    assert result["world"]["same tokens as CPU reference"] == result["world"]["prompts"] == 3
    assert all(t["pass"] for t in result["targets"])
    verdict = json.loads((tmp_path / "verdict.json").read_text())["results"]
    assert set(verdict) == {"smoke-generate", "diagnose"}
    assert all(v["timings"]["decode"] > 0 for v in verdict.values())


def test_model_refuses_fused_beyond_the_kernel_limits():
    """The model launches with check=False, so its sizes are checked once, up front."""
    from ckpt_doctor.model import ModelArgs, Transformer

    with torch.device("meta"):
        wide = Transformer(ModelArgs(dim=1024, n_layers=1, n_heads=2, vocab_size=8, ffn_hidden=8))
    with pytest.raises(KernelInputError, match="head_dim 512") as err:
        wide.set_attention("fused")
    assert "--attention reference" in err.value.hint
    wide.set_attention("reference")


@pytest.mark.parametrize("attention", ["reference", "fused"])
def test_decode_at_a_position_held_in_a_tensor(attention: str):
    """What a CUDA graph replays: the same one-token step with the position in device memory
    (grid sized for the whole cache, empty splits merged with weight 0) gives the same logits
    as the int position, for both attention paths; the kernel directly, too."""
    from ckpt_doctor.loading import load_model
    from ckpt_doctor.reader import open_checkpoint

    world = Path(__file__).resolve().parents[1] / "fixtures" / "world"
    model, _ = load_model(
        open_checkpoint(world / "base"),
        full=open_checkpoint(world / "checkpoint-4.pth"),
        device=DEVICE,
        dtype="float32",
    )
    model.set_attention(attention)
    prompt = torch.randint(3, model.args.vocab_size, (2, 7), generator=torch.Generator())
    prompt = prompt.to(DEVICE)
    with torch.inference_mode():
        caches = [model.new_cache(2, 300), model.new_cache(2, 300)]
        tok = [model(prompt, 0, c).argmax(-1) for c in caches]
        for pos in range(7, 12):
            by_int = model(tok[0][:, None], pos, caches[0])
            by_tensor = model(tok[1][:, None], torch.tensor([pos], device=DEVICE), caches[1])
            torch.testing.assert_close(by_tensor, by_int, rtol=1.3e-6, atol=1e-5)  # fp32
            tok = [by_int.argmax(-1), by_tensor.argmax(-1)]
            assert torch.equal(tok[0], tok[1])
    x = case(1, 1, 150, torch.float32, seed=4)
    g = per_head_gate(torch.tensor([0.4], device=DEVICE), H, gate_fn="raw")
    # A 400-position cache: the grid (3 splits of 192 keys) has two splits past position 150.
    # Beyond it the kernel reads nothing and the reference masks: finite filler either way.
    pad = torch.zeros(1, H, 250, HD, dtype=torch.float64, device=DEVICE)
    x["k"], x["v"] = (torch.cat([torch.nan_to_num(x[n]), pad], dim=2) for n in ("k", "v"))
    args = {"adapter_k": x["ak"].float(), "adapter_v": x["av"].float(), "gate": g}
    q, k, v = x["q"].float(), x["k"].float(), x["v"].float()
    want = gated_attention_reference(q, k, v, start=150, **args)
    got = gated_attention(q, k, v, start=torch.tensor([150], device=DEVICE), **args)
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
    with pytest.raises(KernelInputError, match="one query"):
        gated_attention(q.expand(1, H, 2, HD), k, v, start=torch.tensor([3], device=DEVICE))


def test_ahead_of_time_signatures_specialise_as_the_jit_does():
    """The AOT compile sees what a real launch does: aligned pointers, unit strides constant,
    strides divisible by 16 marked, run-time sizes (START, SPLITS, ...) left unspecialised."""
    code = """if True:
        import json
        from ckpt_doctor.kernels.aot import _jobs, specialise
        fn, args, const, label, _, _ = next(j for j in _jobs(128) if "pos int" in j[3])
        sig, constexprs, attrs = specialise(fn, args, const)
        marked = [fn.arg_names[i] for (i,) in attrs]
        print(json.dumps({"sig": sig, "const": {k: constexprs[k] for k in ("s_kd", "s_qd")},
                          "marked": marked}))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["const"] == {"s_kd": 1, "s_qd": 1}
    assert got["sig"]["K"] == "*fp16" and got["sig"]["START"] == "i32"
    assert {"Q", "K", "V", "Part", "Lse", "s_kt", "s_kh", "H"} <= set(got["marked"])
    assert not {"START", "CHUNK", "SPLITS"} & set(got["marked"])


FAMILIES = Path(__file__).resolve().parents[1] / "fixtures" / "families"


@pytest.mark.parametrize(
    ("base", "adapter"),
    [("meta-base", "v2-chat-prompts/adapter.pth"), ("hf-base", "peft-adaption-prompt")],
)
def test_fused_path_runs_v2_chat_and_peft_to_their_own_codes_tokens(one_thread, base, adapter):
    """The fused kernels cover the other families the model runs (v2 chat's tanh gates and
    bias/scale projections, PEFT's raw scalar gates): upstream's / PEFT's own tokens."""
    expected = json.loads((FAMILIES / "expected.json").read_text())
    run = expected["runs"]["v2-chat-prompts" if "v2" in adapter else "peft-adaption-prompt"]
    results = run["results"][:1]  # the interpreter is slow: one prompt, its first 12 tokens
    args = ["smoke-generate", "--base", str(FAMILIES / base), "--adapter", str(FAMILIES / adapter)]
    args += ["--attention", "fused", "--no-cuda-graph", "--dtype", "float32", "--json"]
    args += ["--device", DEVICE]
    args += ["--max-new-tokens", "12", "--prompt", results[0]["instruction"]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(result.stdout)
    assert doc["attention"] == "fused"
    assert [r["generated_ids"] for r in doc["results"]] == [
        r["generated_ids"][:12] for r in results
    ]


@pytest.mark.parametrize("adapter", [True, False], ids=["adapter", "plain"])
def test_cached_launch_plan_equals_a_fresh_plan(adapter: bool):
    """cached_plan fills this call's tensors and position into a plan built once per shape:
    every argument equals plan()'s (scratch buffers: same shape, new per call), and a new
    stride, size or split layout gets a plan of its own."""
    from ckpt_doctor.kernels import launch

    launch._PLANS.clear()
    for b, t, start, length in [(2, 5, 11, 40), (2, 1, 75, 90), (2, 1, 76, 90), (1, 1, 300, 320)]:
        for in_memory in [False, True] if t == 1 else [False]:
            x = case(b, t, start, torch.float32, device="cpu")
            k = torch.zeros(b, H, length, HD)  # a longer cache than the case's own
            pos = torch.tensor([start]) if in_memory else start
            ad = (x["ak"].float(), x["av"].float(), torch.rand(H)) if adapter else None
            q = x["q"].float()
            out = torch.empty_like(q)
            fresh = launch.plan(q, k, k, out, start=pos, adapter=ad)
            for _ in range(2):  # built, then taken from the cache
                cached = launch.cached_plan(q, k, k, out, start=pos, adapter=ad)
                assert len(cached) == len(fresh)
                for (kernel, grid, args, const), want in zip(cached, fresh, strict=True):
                    assert kernel is want.kernel and const == want.constexprs
                    assert len(args) == len(want.args)
                    mine = [q, k, out, pos, *(ad or ())]  # this call's own tensors
                    for a, w in zip(args, want.args, strict=True):
                        if not isinstance(w, torch.Tensor):
                            assert a == w
                        elif any(w is m for m in mine):
                            assert a is w
                        else:  # scratch, or the unread stand-ins of an absent adapter
                            assert a.shape == w.shape and a.dtype == w.dtype
                    if not callable(grid):
                        assert grid == want.grid
    # prefill; decode over 90 positions: at 75 and 76 one split layout (int), one for a
    # position in a tensor; over 320: int and tensor.
    assert len(launch._PLANS) == 5
