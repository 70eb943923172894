"""``smoke-generate``: load a model as the user would, generate, and say how each prompt ended."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ckpt_doctor import timings
from ckpt_doctor.choices import ATTENTION
from ckpt_doctor.errors import UsageError
from ckpt_doctor.families import check_gate_fn
from ckpt_doctor.findings import Finding, exit_code_for, finding
from ckpt_doctor.generate import GenerationConfig, Result, generate, prompt_ids
from ckpt_doctor.kernels import fused_unavailable_reason
from ckpt_doctor.loading import LoadReport, attach, load_base, plan_adapter
from ckpt_doctor.model import Transformer
from ckpt_doctor.parallel import Shard
from ckpt_doctor.progress import Progress
from ckpt_doctor.reader import Checkpoint, find_tokenizer
from ckpt_doctor.tokenizer import Tokenizer, load_tokenizer

# Alpaca-style instructions used when no --prompt is given.
DEFAULT_PROMPTS = (
    "Tell me about alpacas.",
    "List three primary colors.",
    "Give two tips for staying healthy.",
    "Translate 'good morning' into French.",
    "Write a haiku about the sea.",
)


@dataclass
class SmokeReport:
    load: LoadReport
    results: list[Result]
    tokenizer: Path
    device: str
    attention: str
    cuda_graph: bool  # decode steps replayed as a captured CUDA graph
    findings: list[Finding] = field(default_factory=list)
    # The gate values the run used, per adapted layer (per head): zeros where nothing loaded.
    gates: dict[int, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (timings.py)
    parallel: dict[str, Any] | None = None  # a tensor-parallel run: how it was split
    reused_base_run: bool = False  # the results are the base alone's (base_results)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "load": self.load.to_json(),
            "tokenizer": str(self.tokenizer),
            "device": self.device,
            "attention": self.attention,
            "cuda_graph": self.cuda_graph,
            "results": [r.to_json() for r in self.results],
            "gates": {str(layer): g for layer, g in self.gates.items()},
            "findings": [f.to_json() for f in self.findings],
            "timings": self.timings,
            "world_size": self.parallel["world_size"] if self.parallel else 1,
            **({"parallel": self.parallel} if self.parallel else {}),
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device", hint="use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu or cuda")
    return torch.device(name)


def resolve_attention(name: str, device: torch.device) -> str:
    """auto: the fused kernels on CUDA when Triton is there, the PyTorch reference elsewhere."""
    if name not in ATTENTION:
        raise UsageError(f"unknown attention {name!r}", hint=f"use one of {', '.join(ATTENTION)}")
    reason = fused_unavailable_reason(device)
    if name == "fused" and reason is not None:
        raise UsageError(
            f"--attention fused cannot run: {reason}",
            hint="use --attention reference (auto picks the fused path where it can run)",
        )
    if name == "auto":
        return "fused" if device.type == "cuda" and reason is None else "reference"
    return name


def resolve_tokenizer(base: Checkpoint, tokenizer_path: Path | None) -> Path:
    """--tokenizer, else a tokenizer.model / tokenizer.json beside the base or one level up."""
    found = tokenizer_path or base.tokenizer_path or find_tokenizer(base.path)
    if found is None:
        raise UsageError(
            f"no tokenizer.model or tokenizer.json beside {base.path} or one level up",
            hint="pass --tokenizer PATH",
        )
    return found


def check_vocab(
    tokenizer: Tokenizer, ids: list[list[int]], *, vocab_size: int, tokenizer_path: Path
) -> None:
    """Every id the run feeds the model (prompt ids, bos, eos) must be a row of its embedding:
    another model's tokenizer would index past it (an IndexError on the CPU, a kernel
    failure on CUDA that poisons the whole process)."""
    used = {("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id)}
    used |= {("prompt token", i) for row in ids for i in row}
    beyond = sorted((i, role) for role, i in used if not 0 <= i < vocab_size)
    if beyond:
        i, role = beyond[-1]
        raise UsageError(
            f"{tokenizer_path} does not fit the model: its {role} id {i} (tokenizer vocabulary "
            f"{tokenizer.vocab_size}) is beyond the model's {vocab_size}-row embedding",
            code="VOCAB_MISMATCH",
            hint="pass --tokenizer with the tokenizer.model this base was trained with",
        )


def outcome_findings(results: list[Result], *, dtype: str | None = None) -> list[Finding]:
    """NONFINITE / NO_EOS / LOOP: the behavioural symptoms, with the prompts that showed them.
    ``dtype`` is the one the model ran in (its hint differs for an fp16 overflow)."""
    out = []
    broken = [r for r in results if r.outcome == "nonfinite"]
    loops = [r for r in results if r.outcome == "loop"]
    capped = [r for r in results if r.outcome == "max_tokens"]
    if broken:
        first = min(r.nonfinite_at or 0 for r in broken)
        if dtype == "float16":
            hint = (
                "float16 overflowed: run with --dtype float32 (or bfloat16); ckpt-doctor "
                "inspect shows FP16_OVERFLOW / NONFINITE in the checkpoint"
            )
        else:
            hint = "the weights yield NaN/Inf: run ckpt-doctor inspect on the checkpoint"
        out.append(
            finding(
                "NONFINITE",
                f"{len(broken)} of {len(results)} prompts produced NaN/Inf logits (first at "
                f"generated step {first}, running in {dtype or 'the model dtype'}); "
                "generation stopped there",
                hint,
                prompts=[r.prompt for r in broken],
                dtype=dtype,
            )
        )
    if loops:
        periods = sorted({r.loop.period for r in loops if r.loop})
        out.append(
            finding(
                "LOOP",
                f"{len(loops)} of {len(results)} prompts fell into a loop (periods "
                f"{', '.join(map(str, periods))}) without emitting eos",
                "check what was loaded (LOAD_NOTHING? inert gates?); run ckpt-doctor inspect",
                prompts=[r.prompt for r in loops],
            )
        )
    if capped:
        out.append(
            finding(
                "NO_EOS",
                f"{len(capped)} of {len(results)} prompts reached the token limit without eos "
                f"(highest P(eos) seen: {max(r.max_eos_prob for r in capped):.3f})",
                "check what was loaded, or raise --max-new-tokens if answers are long",
                prompts=[r.prompt for r in capped],
            )
        )
    return out


def smoke_generate(
    base: Checkpoint,
    *,
    adapter: Checkpoint | None = None,
    full: Checkpoint | None = None,
    tokenizer_path: Path | None = None,
    prompts: list[str] | None = None,
    config: GenerationConfig | None = None,
    load_as: str = "strict",
    dtype: str = "auto",
    device: str = "auto",
    gate_fn: str | None = None,
    attention: str = "auto",
    progress: Progress | None = None,
    model: Transformer | None = None,
    shard: Shard | None = None,
    base_results: list[Result] | None = None,
) -> SmokeReport:
    """Load, generate, and say how each prompt ended. ``progress`` hears the load (bytes) and
    the generation (tokens). ``model``: a base already loaded by load_smoke_base with the same
    settings (diagnose's arms share one): the file goes in, and comes out again at the end.
    ``shard``: this process's part of a tensor-parallel run (parallel.py). ``base_results``:
    the base alone's results with the same settings, taken (as copies) instead of generating
    again when the file puts nothing into the model: nothing loaded, no bias / scale, so only
    zero gates, whose adapter term adds exactly 0."""
    config = config or GenerationConfig()
    if gate_fn is not None:
        check_gate_fn(gate_fn)  # before the tokenizer and the weights load
    with timings.recording() as rec:
        setup = _setup(base, tokenizer_path, prompts, config, device, attention, shard)
        report = _run(
            base, setup, adapter, full, load_as, gate_fn, dtype, progress, model, shard,
            base_results,
        )  # fmt: skip
    report.timings = rec.to_json()
    return report


def _run(
    base: Checkpoint,
    setup: _Setup,
    adapter: Checkpoint | None,
    full: Checkpoint | None,
    load_as: str,
    gate_fn: str | None,
    dtype: str,
    progress: Progress | None,
    model: Transformer | None,
    shard: Shard | None,
    base_results: list[Result] | None,
) -> SmokeReport:
    with timings.device_sync(setup.device):
        plan = plan_adapter(base, adapter=adapter, full=full, load_as=load_as, gate_fn=gate_fn)
        if model is None:
            model = _load_base(base, setup, dtype=dtype, progress=progress, shard=shard)
            shared = False
        else:
            shared = True
            if model.args.max_seq_len != setup.max_len:
                raise ValueError("the shared base was built for other prompts or settings")
        load, undo = attach(model, plan, progress=progress)
        try:
            check_vocab(setup.tokenizer, setup.ids, vocab_size=model.args.vocab_size,
                        tokenizer_path=setup.tok_path)  # fmt: skip
            model.set_attention(setup.attention)
            reused = base_results is not None and not (load.from_file or plan.bias or plan.scale)
            if reused:
                results = copy.deepcopy(base_results)
                if progress is not None:
                    n, budget = len(results), setup.config.max_new_tokens * len(results)
                    task = f"generating {n} prompt{'s' * (n != 1)} (as the base alone: no change)"
                    progress(task, budget, budget, "tokens")
            else:
                results = generate(
                    model, setup.tokenizer, setup.instructions, config=setup.config,
                    progress=progress,
                )  # fmt: skip
            gates = {i: _gate(model, i) for i in model.args.adapted_layers}
        finally:
            if shared:
                undo()
    findings = [*load.findings, *outcome_findings(results, dtype=load.dtype)]
    graph = setup.config.cuda_graph and setup.device.type == "cuda"
    report = SmokeReport(
        load, results, setup.tok_path, str(setup.device), setup.attention, graph, findings, gates
    )
    report.reused_base_run = reused
    if shard is not None:
        report.parallel = shard.to_json()
    return report


def _gate(model: Transformer, layer: int) -> list[float]:
    """A layer's gate values, every head (tensor parallel: every process's heads, in order)."""
    g = model.layers[layer].attention.gate.detach().float().flatten()
    return (g if model.gather is None else model.gather(g)).tolist()


@dataclass
class _Setup:
    """What a smoke run settles before loading: device, attention, tokenizer, prompts, and the
    context those prompts need (the model's RoPE table covers exactly that: no hidden cap)."""

    device: torch.device
    attention: str
    tok_path: Path
    tokenizer: Tokenizer
    instructions: list[str]
    ids: list[list[int]]
    config: GenerationConfig
    max_len: int


def _setup(
    base: Checkpoint,
    tokenizer_path: Path | None,
    prompts: list[str] | None,
    config: GenerationConfig,
    device: str,
    attention: str,
    shard: Shard | None,
) -> _Setup:
    dev = resolve_device(device)
    if shard is not None:  # one GPU per process; the decode step is not graph-captured
        dev, config = shard.device(dev), replace(config, cuda_graph=False)
    attn = resolve_attention(attention, dev)
    with timings.phase("read"):
        tok_path = resolve_tokenizer(base, tokenizer_path)
        tokenizer = load_tokenizer(tok_path)
    instructions = list(prompts or DEFAULT_PROMPTS)
    ids = prompt_ids(tokenizer, instructions, config)
    max_len = max(map(len, ids)) + config.max_new_tokens
    return _Setup(dev, attn, tok_path, tokenizer, instructions, ids, config, max_len)


def _load_base(
    base: Checkpoint,
    setup: _Setup,
    *,
    dtype: str,
    progress: Progress | None,
    shard: Shard | None = None,
) -> Transformer:
    return load_base(
        base, dtype=dtype, device=setup.device, max_seq_len=setup.max_len, progress=progress,
        shard=shard, rows=len(setup.instructions),
    )  # fmt: skip


def load_smoke_base(
    base: Checkpoint,
    *,
    tokenizer_path: Path | None = None,
    prompts: list[str] | None = None,
    config: GenerationConfig | None = None,
    dtype: str = "auto",
    device: str = "auto",
    attention: str = "auto",
    progress: Progress | None = None,
    **_: object,
) -> Transformer:
    """The base alone, loaded for smoke runs with these settings (the same keywords as
    smoke_generate): pass it to smoke_generate(model=...) to run several files on one load."""
    setup = _setup(base, tokenizer_path, prompts, config or GenerationConfig(), device,
                   attention, None)  # fmt: skip
    with timings.device_sync(setup.device):
        return _load_base(base, setup, dtype=dtype, progress=progress)
