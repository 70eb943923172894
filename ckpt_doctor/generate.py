"""Batched generation that tells eos from loop from max tokens (docs/generation.md).

Prompts of different lengths decode together the way upstream example.py does: prefill the
shortest prompt length, then step one position at a time, forcing each row's own prompt tokens
until they run out. Every row stops on its own at eos, at a detected loop, or at max new tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_doctor import timings
from ckpt_doctor.cpu_layout import SMALL_MODEL_DIM
from ckpt_doctor.errors import UsageError
from ckpt_doctor.loops import Loop, LoopDetector
from ckpt_doctor.model import KVCache, Transformer
from ckpt_doctor.progress import Progress
from ckpt_doctor.tokenizer import TEMPLATES, Tokenizer, format_prompt

# How a generation ends (eos, a loop, the token limit) or NaN/Inf logits: the one list.
OUTCOMES = ("eos", "loop", "max_tokens", "nonfinite")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    template: str = "alpaca"
    stop_on_loop: bool = True
    cuda_graph: bool = True  # on CUDA, replay the one-token step as a captured CUDA graph

    def __post_init__(self) -> None:
        # Checked here, before any model loads: nonsense would otherwise surface as an
        # internal torch error (NaN temperature), silent greedy decoding (negative), or a
        # nonsense context size (max_new_tokens <= 0).
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(
                f"--max-new-tokens {n!r}: generation needs at least 1 new token",
                hint="pass --max-new-tokens 1 or more (answers usually need 64-512)",
            )
        t = self.temperature
        if not math.isfinite(t) or t < 0:
            raise UsageError(
                f"--temperature {t!r}: must be a finite number >= 0",
                hint="0 is greedy decoding; 0.7-1.0 samples",
            )
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise UsageError(
                f"--top-p {self.top_p!r}: must be in (0, 1]",
                hint="1 keeps the whole distribution; 0.9 keeps the top 90% of the mass",
            )
        if self.template not in TEMPLATES:
            raise UsageError(
                f"unknown prompt template {self.template!r}",
                hint=f"use one of: {', '.join(sorted(TEMPLATES))}",
            )


@dataclass
class Result:
    prompt: str  # the instruction as given
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)  # up to and excluding eos
    outcome: str = "max_tokens"  # one of OUTCOMES
    loop: Loop | None = None
    eos_probs: list[float] = field(default_factory=list)  # P(eos) at every generated step
    text: str = ""
    loop_char: int | None = None  # where the repeating part starts in ``text``
    nonfinite_at: int | None = None  # generated step whose logits held NaN/Inf

    @property
    def max_eos_prob(self) -> float:
        return max(self.eos_probs, default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "prompt_ids": self.prompt_ids,
            "generated_ids": self.generated_ids,
            "text": self.text,
            "outcome": self.outcome,
            "loop": self.loop.to_json() if self.loop else None,
            "nonfinite_at": self.nonfinite_at,
            "tokens": len(self.generated_ids),
            "max_eos_prob": self.max_eos_prob,
            "eos_probs": [round(p, 6) for p in self.eos_probs],
        }


def _sample(logits: torch.Tensor, config: GenerationConfig, gen: torch.Generator) -> torch.Tensor:
    if config.temperature <= 0:
        return logits.argmax(-1)
    # A row with NaN/Inf logits stops (the caller sees it); make it uniform so multinomial
    # does not raise on it first.
    logits = torch.where(logits.isfinite().all(-1, keepdim=True), logits, 0.0)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:  # nucleus: keep the smallest prefix of mass >= top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > config.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@contextmanager
def cpu_tuned(model: Transformer, rows: int) -> Iterator[None]:
    """CPU settings for decoding ``rows`` sequences. Small models (dim <= 512) get one intra-op
    thread: their matmuls take microseconds, and waking a second thread costs more
    (milliseconds when another process holds that core). Larger ones get their weights laid out
    for the batch size (Transformer.lay_out_weights)."""
    if model.tok_embeddings.weight.device.type != "cpu":
        yield
        return
    if model.args.dim > SMALL_MODEL_DIM:
        with timings.phase("build"):
            model.lay_out_weights(rows=rows)
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# step(ids [B], position) -> fp32 logits [B, V]: one token per row at one position.
Step = Callable[[torch.Tensor, int], torch.Tensor]


def decode_step(model: Transformer, cache: KVCache, *, graph: bool) -> Step:
    """The one-token step of generation over ``cache``.

    With ``graph`` the step reads its ids and its position from static device tensors, so on
    CUDA it is captured once as a CUDA graph and each call only copies the inputs in and replays
    it: a 7B step is about a thousand small kernels, more than eager PyTorch launches in the
    time the weights take to stream. Off CUDA that static form runs eagerly (what CPU tests
    check). Make the step before the prefill: the warm-up runs write cache position 0."""
    if not graph:
        return lambda ids, position: model(ids[:, None], position, cache)
    device = cache.k[0].device
    ids_in = torch.zeros(cache.k[0].shape[0], 1, dtype=torch.long, device=device)
    pos_in = torch.zeros(1, dtype=torch.long, device=device)

    def load(ids: torch.Tensor, position: int) -> None:
        ids_in.copy_(ids[:, None])
        pos_in.fill_(position)

    if device.type != "cuda":

        def eager(ids: torch.Tensor, position: int) -> torch.Tensor:
            load(ids, position)
            return model(ids_in, pos_in, cache)

        return eager
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the capture: kernel compiles, allocator pools
        for _ in range(3):
            model(ids_in, pos_in, cache)
    torch.cuda.current_stream(device).wait_stream(side)
    graph_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_):
        logits = model(ids_in, pos_in, cache)

    def replay(ids: torch.Tensor, position: int) -> torch.Tensor:
        load(ids, position)
        graph_.replay()
        return logits  # overwritten by the next replay: use it before calling again

    return replay


def prompt_ids(
    tokenizer: Tokenizer, instructions: list[str], config: GenerationConfig
) -> list[list[int]]:
    """Each instruction under the config's template, tokenized: [bos] + ids, no eos."""
    return [
        tokenizer.prompt_ids(format_prompt(text, template=config.template)) for text in instructions
    ]


def context_length(tokenizer: Tokenizer, instructions: list[str], config: GenerationConfig) -> int:
    """Positions a generation needs (the longest prompt plus max_new_tokens): what the KV
    cache and the model's RoPE table must cover."""
    return max(map(len, prompt_ids(tokenizer, instructions, config))) + config.max_new_tokens


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    instructions: list[str],
    *,
    config: GenerationConfig | None = None,
    progress: Progress | None = None,
) -> list[Result]:
    """Generate for every instruction in one batch; an outcome per prompt. ``progress`` hears
    the tokens after every step (a finished prompt counts its whole budget)."""
    with cpu_tuned(model, len(instructions)):
        return _generate(model, tokenizer, instructions, config or GenerationConfig(), progress)


def _generate(
    model: Transformer,
    tokenizer: Tokenizer,
    instructions: list[str],
    config: GenerationConfig,
    progress: Progress | None = None,
) -> list[Result]:
    device = model.tok_embeddings.weight.device
    ids = prompt_ids(tokenizer, instructions, config)
    results = [Result(text, p) for text, p in zip(instructions, ids, strict=True)]
    lengths = [len(r.prompt_ids) for r in results]
    # The whole budget or an error, never a silent cut: the cache holds exactly this much.
    total = max(lengths) + config.max_new_tokens
    if total > model.args.max_seq_len:
        raise UsageError(
            f"the longest prompt has {max(lengths)} tokens and max_new_tokens is "
            f"{config.max_new_tokens}: {total} positions, but the model was built for "
            f"{model.args.max_seq_len}",
            hint="load the model with max_seq_len >= "
            f"{total} (generate.context_length computes it), or shorten the prompt",
        )
    tokens = torch.zeros((len(results), total), dtype=torch.long, device=device)
    for i, r in enumerate(results):
        tokens[i, : lengths[i]] = torch.tensor(r.prompt_ids, device=device)
    detectors = [LoopDetector() for _ in results]
    done = [False] * len(results)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    cache = model.new_cache(len(results), total)
    with timings.phase("compile_capture"):
        step = decode_step(model, cache, graph=config.cuda_graph and device.type == "cuda")
    prev = 0
    with timings.phase("decode"):  # the prefill is a phase of its own inside
        for pos in range(min(lengths), total):
            if pos - prev == 1:
                logits = step(tokens[:, prev], prev)
            else:  # the prefill: every position all prompts share
                with timings.phase("prefill"):
                    logits = model(tokens[:, prev:pos], prev, cache)
            eos_prob = torch.softmax(logits, dim=-1)[:, tokenizer.eos_id]
            finite = logits.isfinite().all(-1)  # NaN/Inf logits: nothing sensible follows
            sampled = _sample(logits, config, gen)
            # One device sync a step, not per row and not per quantity: P(eos), the sampled token
            # and the finiteness flag travel together (float64 holds every token id exactly).
            rows = torch.stack([eos_prob.double(), sampled.double(), finite.double()], 1)
            agree = getattr(model, "agree", None)  # tensor parallel: all take rank 0's tokens
            if agree is not None:
                rows = agree(rows)
            rows = rows.tolist()
            column = [int(token) for _, token, _ in rows]
            prev = pos
            for i, r in enumerate(results):
                if pos < lengths[i]:  # still inside this row's prompt: force it
                    column[i] = r.prompt_ids[pos]
                    continue
                if done[i]:
                    column[i] = tokenizer.eos_id  # keep finished rows cheap and deterministic
                    continue
                if not rows[i][2]:
                    r.outcome, r.nonfinite_at, done[i] = "nonfinite", len(r.generated_ids), True
                    column[i] = tokenizer.eos_id
                    continue
                token = column[i]
                r.eos_probs.append(rows[i][0])
                if token == tokenizer.eos_id:
                    r.outcome, done[i] = "eos", True
                    continue
                r.generated_ids.append(token)
                loop = detectors[i].push(token)
                if loop is not None and r.loop is None:
                    r.loop = loop
                if loop is not None and config.stop_on_loop:
                    r.outcome, done[i] = "loop", True
                elif len(r.generated_ids) >= config.max_new_tokens:
                    done[i] = True
            tokens[:, pos] = torch.tensor(column, device=device)
            if progress is not None:
                _report(progress, results, done, config.max_new_tokens)
            if all(done):
                break
    for r in results:
        r.text = tokenizer.decode(r.generated_ids)
        if r.loop is not None:
            r.loop_char = len(tokenizer.decode(r.generated_ids[: r.loop.start]))
    return results


def _report(progress: Progress, results: list[Result], done: list[bool], budget: int) -> None:
    """Tokens so far of every prompt's budget; a finished prompt has used all of its own."""
    finished = sum(done)
    made = sum(budget if d else len(r.generated_ids) for r, d in zip(results, done, strict=True))
    task = f"generating {len(results)} prompt{'s' * (len(results) != 1)} ({finished} finished)"
    progress(task, made, budget * len(results), "tokens")
