"""generate(): outcomes per prompt, batching, sampling; with a scripted model and a real one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ckpt_doctor.errors import UsageError
from ckpt_doctor.generate import GenerationConfig, context_length, generate
from ckpt_doctor.loading import load_model
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.tokenizer import Tokenizer

BUNDLE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"
EOS, BOS = 2, 1


class CharTokenizer(Tokenizer):
    """One id per character (ids 3..), enough to drive generate() without sentencepiece."""

    def __init__(self, vocab_size: int = 128) -> None:
        self.path = Path("chars")
        self.bos_id, self.eos_id, self.vocab_size = BOS, EOS, vocab_size

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % (self.vocab_size - 3) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(97 + (i - 3) % 26) for i in ids if i not in (BOS, EOS))


class ScriptedModel:
    """Emits script[row][k] as its k-th generated token (a logit of 10 vs 0 elsewhere)."""

    def __init__(self, scripts: list[list[int]], vocab: int = 16) -> None:
        self.scripts, self.vocab = scripts, vocab
        self.tok_embeddings = SimpleNamespace(weight=torch.zeros(1))
        self.args = SimpleNamespace(max_seq_len=4096, dim=8)
        self.lengths: list[int] = []

    def new_cache(self, batch: int, length: int) -> None:
        return None

    def __call__(self, tokens: torch.Tensor, start: int, cache: None) -> torch.Tensor:
        pos = start + tokens.shape[1]  # the position being predicted
        logits = torch.zeros(tokens.shape[0], self.vocab)
        for row, script in enumerate(self.scripts):
            k = pos - self.lengths[row]
            if k >= 0:
                logits[row, script[k % len(script)] if k < len(script) else 5] = 10.0
        return logits


def run(scripts: list[list[int]], prompts: list[str], **cfg) -> list:
    tok = CharTokenizer()
    model = ScriptedModel(scripts)
    model.lengths = [len(tok.prompt_ids(p)) for p in prompts]
    config = GenerationConfig(template="none", **cfg)
    return generate(model, tok, prompts, config=config)  # type: ignore[arg-type]


def test_outcomes_eos_loop_and_max_tokens_in_one_batch():
    g = torch.Generator().manual_seed(0)
    no_loop = (3 + torch.randint(0, 13, (40,), generator=g)).tolist()  # no 32-token period
    results = run(
        [[7, 8, 9, EOS], [4, 5, 6] * 30, no_loop],
        ["ab", "a much longer prompt", "xyz"],
        max_new_tokens=40,
    )
    eos, loop, capped = results
    assert (eos.outcome, eos.generated_ids) == ("eos", [7, 8, 9])
    assert loop.outcome == "loop" and loop.loop.period == 3 and loop.loop.start == 0
    assert len(loop.generated_ids) == 32  # declared once the last 32 tokens are 3-periodic
    assert capped.outcome == "max_tokens" and len(capped.generated_ids) == 40
    # P(eos) recorded at every generated step, eos step included
    assert len(eos.eos_probs) == 4 and eos.eos_probs[-1] > 0.99
    assert eos.prompt_ids[0] == BOS and EOS not in eos.prompt_ids
    repeats = pytest.approx(32 / 3, abs=0.01)
    assert loop.to_json()["loop"] == {"period": 3, "start": 0, "repeats": repeats}


def test_loop_reported_but_not_stopped_when_asked():
    (r,) = run([[4, 5] * 40], ["p"], max_new_tokens=60, stop_on_loop=False)
    assert r.outcome == "max_tokens" and r.loop is not None and r.loop.period == 2


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_model(
        open_checkpoint(BUNDLE / "base"), full=open_checkpoint(BUNDLE / "checkpoint-4.pth")
    )
    return model


def test_batched_greedy_equals_one_at_a_time(tiny_model):
    prompts = ["hi", "a longer prompt here", "mid size"]
    tok = CharTokenizer()
    config = GenerationConfig(template="none", max_new_tokens=20, stop_on_loop=False)
    batched = generate(tiny_model, tok, prompts, config=config)
    for prompt, b in zip(prompts, batched, strict=True):
        (single,) = generate(tiny_model, tok, [prompt], config=config)
        assert single.generated_ids == b.generated_ids
        assert single.eos_probs == pytest.approx(b.eos_probs, abs=1e-5)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tiny_model):
    tok = CharTokenizer()
    base = {"template": "none", "max_new_tokens": 15, "stop_on_loop": False}
    sample = GenerationConfig(temperature=1.0, seed=7, **base)
    a = generate(tiny_model, tok, ["hello"], config=sample)[0].generated_ids
    b = generate(tiny_model, tok, ["hello"], config=sample)[0].generated_ids
    assert a == b
    nucleus = GenerationConfig(temperature=1.0, top_p=1e-6, seed=3, **base)
    greedy = GenerationConfig(**base)
    assert (
        generate(tiny_model, tok, ["hello"], config=nucleus)[0].generated_ids
        == generate(tiny_model, tok, ["hello"], config=greedy)[0].generated_ids
    )


def test_static_step_generates_what_the_eager_step_does(tiny_model, monkeypatch):
    """The step a CUDA graph captures (ids and position in static device tensors), run eagerly:
    same tokens and P(eos) as the plain step, prompts of different lengths in one batch.
    (tests/test_kernels.py checks the fused kernels' side of a position held in a tensor.)"""
    from ckpt_doctor import generate as gen

    tok = CharTokenizer()
    prompts = ["hi", "a longer prompt here", "mid size"]
    config = GenerationConfig(template="none", max_new_tokens=12, stop_on_loop=False)
    eager = generate(tiny_model, tok, prompts, config=config)
    positions = []
    original = gen.decode_step

    def static_step(model, cache, *, graph):
        step = original(model, cache, graph=True)
        return lambda ids, position: positions.append(position) or step(ids, position)

    monkeypatch.setattr(gen, "decode_step", static_step)
    got = generate(tiny_model, tok, prompts, config=config)
    shortest = min(len(tok.prompt_ids(p)) for p in prompts)
    assert positions == list(range(shortest, len(tok.prompt_ids(prompts[1])) + 11))
    for e, g in zip(eager, got, strict=True):
        assert g.generated_ids == e.generated_ids and len(g.generated_ids) == 12
        assert g.eos_probs == pytest.approx(e.eos_probs, abs=1e-6)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 2.0),
        ("top_p", float("nan")),
        ("template", "bogus"),
    ],
)
def test_config_refuses_nonsense_with_a_usage_error(option, value):
    with pytest.raises(UsageError) as info:
        GenerationConfig(**{option: value})
    assert info.value.hint and info.value.exit_code == 2


def test_the_whole_budget_or_an_error_never_a_silent_cut(tiny_model):
    """The model's context must cover longest prompt + max_new_tokens; generate() says so
    instead of quietly generating fewer tokens."""
    tok = CharTokenizer()
    prompt = "x" * 40
    config = GenerationConfig(template="none", max_new_tokens=30, stop_on_loop=False)
    need = len(tok.prompt_ids(prompt)) + 30
    assert context_length(tok, [prompt, "short"], config) == need
    small = ScriptedModel([[4]])
    small.args.max_seq_len = need - 1
    small.lengths = [len(tok.prompt_ids(prompt))]
    with pytest.raises(UsageError, match=f"{need} positions") as info:
        generate(small, tok, [prompt], config=config)  # type: ignore[arg-type]
    assert "max_seq_len" in info.value.hint
    small.args.max_seq_len = need
    (r,) = generate(small, tok, [prompt], config=config)  # type: ignore[arg-type]
    assert r.outcome == "max_tokens" and len(r.generated_ids) == 30


class NanAfter(ScriptedModel):
    """A scripted model whose row 0 logits turn NaN from its ``k``-th generated token on."""

    def __init__(self, scripts: list[list[int]], k: int) -> None:
        super().__init__(scripts)
        self.k, self.calls = k, 0

    def __call__(self, tokens: torch.Tensor, start: int, cache: None) -> torch.Tensor:
        self.calls += 1
        logits = super().__call__(tokens, start, cache)
        if start + tokens.shape[1] - self.lengths[0] >= self.k:
            logits[0, 3] = float("nan")
        return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nonfinite_logits_stop_the_row_with_one_sync_a_step(monkeypatch, temperature):
    tok = CharTokenizer()
    prompts = ["ab", "cd"]
    model = NanAfter([[7, 8, 9, 10, 11, 12], [4, 5, 6, 7, 8, 9]], k=3)
    model.lengths = [len(tok.prompt_ids(p)) for p in prompts]
    syncs = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append(1) or real(t))
    config = GenerationConfig(template="none", max_new_tokens=6, temperature=temperature)
    broken, fine = generate(model, tok, prompts, config=config)  # type: ignore[arg-type]
    assert broken.outcome == "nonfinite" and broken.nonfinite_at == 3
    assert len(broken.generated_ids) == 3 and len(broken.eos_probs) == 3
    assert all(p == p for p in broken.eos_probs)  # no NaN leaks into P(eos) (or the JSON)
    assert fine.outcome == "max_tokens" and len(fine.generated_ids) == 6
    assert broken.to_json()["nonfinite_at"] == 3
    assert len(syncs) == model.calls  # still one host sync per step
