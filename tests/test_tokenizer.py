"""Prompt templates and tokenizers, on tiny tokenizers trained here (no network, tmp_path only)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpt_doctor.errors import EmptyFileError, UnreadableError, UsageError
from ckpt_doctor.tokenizer import (
    TEMPLATES,
    HFTokenizer,
    SentencePieceTokenizer,
    format_prompt,
    load_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "below", "is", "an"),
    *("instruction", "that", "describes", "task", "write", "response", "appropriately"),
    *("completes", "request", "###", "Instruction:", "Response:", "name", "three"),
]
ALPACA_FOX = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName three foxes.\n\n### Response:"
)


def corpus() -> list[str]:
    return [" ".join(WORDS[(i * j) % len(WORDS)] for j in range(1, 12)) for i in range(300)]


def train_sentencepiece(path: Path, *, bos_id: int = 1, eos_id: int = 2) -> Path:
    """A ~1.5 kB BPE tokenizer.model, trained in ~20 ms."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=120,
        model_type="bpe",
        unk_id=0,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=-1,
        num_threads=1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def build_hf(
    folder: Path,
    *,
    specials: tuple[str, ...] = ("<unk>", "<s>", "</s>"),
    post_bos: str | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A byte-level BPE tokenizer.json (and tokenizer_config.json when ``config`` is given)."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(specials),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if post_bos is not None:  # a post-processor that would add bos if add_special_tokens=True
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{post_bos} $A", special_tokens=[(post_bos, tok.token_to_id(post_bos))]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder / "tokenizer.json"


# -- prompt templates ----------------------------------------------------------------------


def test_alpaca_template_exact_text() -> None:
    assert format_prompt("Name three foxes.") == ALPACA_FOX
    assert format_prompt("Name three foxes.", template="alpaca") == ALPACA_FOX


def test_none_template_is_the_instruction_as_is() -> None:
    assert format_prompt("  raw {text}\n", template="none") == "  raw {text}\n"
    assert set(TEMPLATES) == {"alpaca", "none"}


def test_braces_in_instruction_are_kept() -> None:
    assert "### Instruction:\nf({x}) = {}\n\n" in format_prompt("f({x}) = {}")


def test_unknown_template_lists_known_ones() -> None:
    with pytest.raises(UsageError) as info:
        format_prompt("hi", template="vicuna")
    assert "vicuna" in info.value.message
    assert "alpaca" in info.value.hint and "none" in info.value.hint


# -- sentencepiece ---------------------------------------------------------------------------


def test_sentencepiece_round_trip(tmp_path: Path) -> None:
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path / "tokenizer.model"))
    text = "the quick brown fox jumps over a lazy dog"
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 120


def test_sentencepiece_prompt_ids_bos_no_eos(tmp_path: Path) -> None:
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    text = "write a response"
    ids = tok.prompt_ids(text)
    assert ids == [tok.bos_id, *tok.encode(text)]
    assert tok.bos_id not in tok.encode(text)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text  # bos is a control token: it decodes to nothing


def test_sentencepiece_bos_eos_come_from_the_file(tmp_path: Path) -> None:
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path / "t.model", bos_id=5, eos_id=7))
    assert (tok.bos_id, tok.eos_id) == (5, 7)
    assert tok.prompt_ids("the fox")[0] == 5
    assert 7 not in tok.prompt_ids("the fox")


# -- HF tokenizers ---------------------------------------------------------------------------


def test_hf_round_trip_of_an_alpaca_prompt(tmp_path: Path) -> None:
    tok = HFTokenizer(build_hf(tmp_path))
    ids = tok.encode(ALPACA_FOX)
    assert tok.decode(ids) == ALPACA_FOX
    assert tok.vocab_size == 300  # 256 bytes + 3 specials + merges


def test_hf_llama_bos_eos_and_no_special_tokens_added(tmp_path: Path) -> None:
    tok = HFTokenizer(build_hf(tmp_path, post_bos="<s>"))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.prompt_ids("the lazy dog")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.eos_id not in ids
    assert ids == [tok.bos_id, *tok.encode("the lazy dog")]


def test_hf_llama3_token_names(tmp_path: Path) -> None:
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
    tok = HFTokenizer(build_hf(tmp_path, specials=specials))
    assert (tok.bos_id, tok.eos_id) == (0, 1)


@pytest.mark.parametrize(
    "config",
    [
        {"bos_token": "<bos>", "eos_token": "<eos>"},
        {"bos_token": {"content": "<bos>", "lstrip": False}, "eos_token": {"content": "<eos>"}},
    ],
)
def test_hf_tokenizer_config_names_the_tokens(tmp_path: Path, config: dict[str, Any]) -> None:
    # "<s>" / "</s>" exist too, so the ids prove that the config won.
    specials = ("<unk>", "<s>", "</s>", "<pad>", "<bos>", "<eos>")
    tok = HFTokenizer(build_hf(tmp_path, specials=specials, config=config))
    assert (tok.bos_id, tok.eos_id) == (4, 5)
    assert tok.prompt_ids("the dog")[0] == 4


def test_hf_config_without_tokens_falls_back_to_names(tmp_path: Path) -> None:
    tok = HFTokenizer(build_hf(tmp_path, config={"bos_token": None, "model_max_length": 2048}))
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_hf_config_naming_an_unknown_token(tmp_path: Path) -> None:
    path = build_hf(tmp_path, config={"bos_token": "<start>", "eos_token": "</s>"})
    with pytest.raises(UnreadableError, match="<start>"):
        HFTokenizer(path)


def test_hf_without_any_bos_token(tmp_path: Path) -> None:
    path = build_hf(tmp_path, specials=("<unk>", "<pad>"))
    with pytest.raises(UnreadableError) as info:
        HFTokenizer(path)
    assert "bos" in info.value.message
    assert "tokenizer_config.json" in info.value.hint


def test_hf_corrupt_tokenizer_config(tmp_path: Path) -> None:
    path = build_hf(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(UnreadableError, match=r"tokenizer_config\.json"):
        HFTokenizer(path)


# -- load_tokenizer ----------------------------------------------------------------------------


def test_load_by_file(tmp_path: Path) -> None:
    sp = load_tokenizer(train_sentencepiece(tmp_path / "sp" / "tokenizer.model"))
    hf = load_tokenizer(str(build_hf(tmp_path / "hf")))
    assert isinstance(sp, SentencePieceTokenizer)
    assert isinstance(hf, HFTokenizer)
    assert sp.path == tmp_path / "sp" / "tokenizer.model"


def test_load_by_directory(tmp_path: Path) -> None:
    train_sentencepiece(tmp_path / "sp" / "tokenizer.model")
    build_hf(tmp_path / "hf")
    assert isinstance(load_tokenizer(tmp_path / "sp"), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "hf"), HFTokenizer)
    train_sentencepiece(tmp_path / "hf" / "tokenizer.model")  # both: the .model wins
    assert isinstance(load_tokenizer(tmp_path / "hf"), SentencePieceTokenizer)


def test_load_bad_paths_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(UsageError, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_corrupt_file_is_unreadable(tmp_path: Path, name: str) -> None:
    pytest.importorskip("sentencepiece" if name.endswith(".model") else "tokenizers")
    path = tmp_path / name
    path.write_bytes(b"\x00garbage{" * 16)
    with pytest.raises(UnreadableError) as info:
        load_tokenizer(path)
    assert str(path) in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_empty_file_is_empty(tmp_path: Path, name: str) -> None:
    pytest.importorskip("sentencepiece" if name.endswith(".model") else "tokenizers")
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(EmptyFileError, match="empty"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("module", "name", "extra"),
    [
        ("sentencepiece", "tokenizer.model", "sentencepiece"),
        ("tokenizers", "x.json", "hf-tokenizers"),
    ],
)
def test_missing_package_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str, extra: str
) -> None:
    (tmp_path / name).write_bytes(b"not read: the import fails first")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(UsageError) as info:
        load_tokenizer(tmp_path / name)
    assert info.value.hint == f"pip install 'ckpt-doctor[{extra}]'"


def test_import_pulls_in_no_optional_package() -> None:
    code = (
        "import sys, ckpt_doctor.tokenizer\n"
        "print(sorted(m for m in ('torch', 'sentencepiece', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
