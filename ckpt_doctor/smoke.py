"""``smoke-generate``: load a model as the user would, generate, and say how each prompt ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_doctor.choices import ATTENTION
from ckpt_doctor.errors import UsageError
from ckpt_doctor.families import check_gate_fn
from ckpt_doctor.findings import Finding, exit_code_for, finding
from ckpt_doctor.generate import GenerationConfig, Result, context_length, generate, prompt_ids
from ckpt_doctor.kernels import fused_unavailable_reason
from ckpt_doctor.loading import LoadReport, load_model
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
    another model's tokenizer would index past it (an IndexError on the CPU, a device-side
    assert on CUDA)."""
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
) -> SmokeReport:
    """Load, generate, and say how each prompt ended. ``progress`` hears the load (bytes) and
    the generation (tokens)."""
    config = config or GenerationConfig()
    if gate_fn is not None:
        check_gate_fn(gate_fn)  # before the tokenizer and the weights load
    dev = resolve_device(device)
    attn = resolve_attention(attention, dev)
    tok_path = resolve_tokenizer(base, tokenizer_path)
    tokenizer = load_tokenizer(tok_path)
    instructions = list(prompts or DEFAULT_PROMPTS)
    # The model's context (RoPE table) covers exactly what these prompts need: no hidden cap.
    max_len = context_length(tokenizer, instructions, config)
    model, load = load_model(
        base,
        adapter=adapter,
        full=full,
        load_as=load_as,
        dtype=dtype,
        device=dev,
        gate_fn=gate_fn,
        max_seq_len=max_len,
        progress=progress,
    )
    ids = prompt_ids(tokenizer, instructions, config)
    check_vocab(tokenizer, ids, vocab_size=model.args.vocab_size, tokenizer_path=tok_path)
    model.set_attention(attn)
    results = generate(model, tokenizer, instructions, config=config, progress=progress)
    findings = [*load.findings, *outcome_findings(results, dtype=load.dtype)]
    graph = config.cuda_graph and dev.type == "cuda"
    gates = {
        i: model.layers[i].attention.gate.detach().float().flatten().tolist()
        for i in model.args.adapted_layers
    }
    return SmokeReport(load, results, tok_path, str(dev), attn, graph, findings, gates)
