"""Batched generation that tells eos from loop from max tokens (SPEC section 4).

Prompts of different lengths decode together the way upstream example.py does: prefill the
shortest prompt length, then step one position at a time, forcing each row's own prompt tokens
until they run out. Every row stops on its own at eos, at a detected loop, or at max new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_doctor.errors import UsageError
from ckpt_doctor.loops import Loop, LoopDetector
from ckpt_doctor.model import Transformer
from ckpt_doctor.tokenizer import Tokenizer, format_prompt

SMALL_MODEL_DIM = 512


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    template: str = "alpaca"
    stop_on_loop: bool = True


@dataclass
class Result:
    prompt: str  # the instruction as given
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)  # up to and excluding eos
    outcome: str = "max_tokens"
    loop: Loop | None = None
    eos_probs: list[float] = field(default_factory=list)  # P(eos) at every generated step
    text: str = ""
    loop_char: int | None = None  # where the repeating part starts in ``text``

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
            "tokens": len(self.generated_ids),
            "max_eos_prob": self.max_eos_prob,
            "eos_probs": [round(p, 6) for p in self.eos_probs],
        }


def _sample(logits: torch.Tensor, config: GenerationConfig, gen: torch.Generator) -> torch.Tensor:
    if config.temperature <= 0:
        return logits.argmax(-1)
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
        model.lay_out_weights(rows=rows)
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    instructions: list[str],
    *,
    config: GenerationConfig | None = None,
) -> list[Result]:
    """Generate for every instruction in one batch; an outcome per prompt."""
    with cpu_tuned(model, len(instructions)):
        return _generate(model, tokenizer, instructions, config or GenerationConfig())


def _generate(
    model: Transformer, tokenizer: Tokenizer, instructions: list[str], config: GenerationConfig
) -> list[Result]:
    device = model.tok_embeddings.weight.device
    results = [
        Result(text, tokenizer.prompt_ids(format_prompt(text, template=config.template)))
        for text in instructions
    ]
    lengths = [len(r.prompt_ids) for r in results]
    total = min(max(lengths) + config.max_new_tokens, model.args.max_seq_len)
    if max(lengths) >= total:
        raise UsageError(
            f"a prompt has {max(lengths)} tokens; the model context is {model.args.max_seq_len}",
            hint="shorten the prompt or lower --max-new-tokens",
        )
    tokens = torch.zeros((len(results), total), dtype=torch.long, device=device)
    for i, r in enumerate(results):
        tokens[i, : lengths[i]] = torch.tensor(r.prompt_ids, device=device)
    detectors = [LoopDetector() for _ in results]
    done = [False] * len(results)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    cache = model.new_cache(len(results), total)
    prev = 0
    for pos in range(min(lengths), total):
        logits = model(tokens[:, prev:pos], prev, cache)
        probs = torch.softmax(logits, dim=-1)
        chosen = _sample(logits, config, gen)
        prev = pos
        for i, r in enumerate(results):
            if pos < lengths[i]:  # still inside this row's prompt: force it
                continue
            if done[i]:
                chosen[i] = tokenizer.eos_id  # keep finished rows cheap and deterministic
                continue
            token = int(chosen[i])
            r.eos_probs.append(float(probs[i, tokenizer.eos_id]))
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
        tokens[:, pos] = torch.where(
            torch.tensor([pos < n for n in lengths], device=device), tokens[:, pos], chosen
        )
        if all(done):
            break
    for r in results:
        r.text = tokenizer.decode(r.generated_ids)
        if r.loop is not None:
            r.loop_char = len(tokenizer.decode(r.generated_ids[: r.loop.start]))
    return results
