"""Prompt formatting and tokenizers (docs/generation.md), behind one small interface.

``tokenizer.model`` is read with sentencepiece, ``tokenizer.json`` with HF ``tokenizers``; both
packages are optional extras, imported only when a tokenizer of that kind is loaded. Prompt ids
are ``[bos] + encode(text)`` with no eos, and bos / eos always come from the tokenizer itself.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckpt_doctor.errors import EmptyFileError, UnreadableError, UsageError

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES: dict[str, str] = {"alpaca": ALPACA_TEMPLATE, "none": "{instruction}"}

# bos / eos token names tried, in order, when no tokenizer_config.json names them.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>")


def format_prompt(instruction: str, *, template: str = "alpaca") -> str:
    """The prompt text for ``instruction`` under a named template (``alpaca`` or ``none``)."""
    if template not in TEMPLATES:
        known = ", ".join(sorted(TEMPLATES))
        raise UsageError(f"unknown prompt template {template!r}", hint=f"use one of: {known}")
    # str.replace, not str.format: the instruction may itself contain braces.
    return TEMPLATES[template].replace("{instruction}", instruction)


class Tokenizer(ABC):
    """A loaded tokenizer: ids of text, text of ids, and the bos / eos ids it defines."""

    path: Path
    bos_id: int
    eos_id: int
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with neither bos nor eos."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control / special tokens such as bos and eos are dropped."""

    def prompt_ids(self, text: str) -> list[int]:
        """``[bos] + encode(text)``: what the model is fed for a prompt (no eos)."""
        return [self.bos_id, *self.encode(text)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (LLaMA 1 / 2)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        spm = _import_optional("sentencepiece", extra="sentencepiece")
        _check_not_empty(self.path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as exc:
            raise _corrupt(self.path, exc, "sentencepiece model") from exc
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.vocab_size = int(self._sp.vocab_size())
        for name, value in (("bos", self.bos_id), ("eos", self.eos_id)):
            if value < 0:
                raise UnreadableError(
                    f"{self.path}: the sentencepiece model defines no {name} token",
                    hint="use the tokenizer.model the checkpoint was trained with",
                )

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._sp.encode(text, out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode([int(i) for i in ids]))


class HFTokenizer(Tokenizer):
    """An HF ``tokenizer.json``; bos / eos from a ``tokenizer_config.json`` beside it if any."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        tokenizers = _import_optional("tokenizers", extra="hf-tokenizers")
        _check_not_empty(self.path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises bare Exception for bad JSON
            raise _corrupt(self.path, exc, "tokenizers JSON file") from exc
        config = _read_tokenizer_config(self.path.parent / "tokenizer_config.json")
        self.bos_id = self._special_id("bos", config.get("bos_token"), _BOS_CANDIDATES)
        self.eos_id = self._special_id("eos", config.get("eos_token"), _EOS_CANDIDATES)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids]))

    def _special_id(self, role: str, configured: Any, candidates: tuple[str, ...]) -> int:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str) and configured:
            token_id = self._tok.token_to_id(configured)
            if token_id is None:
                raise UnreadableError(
                    f"{self.path}: tokenizer_config.json names {role} token {configured!r}, "
                    "which the tokenizer does not have",
                    hint="the tokenizer.json and tokenizer_config.json are from different models",
                )
            return int(token_id)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        tried = " / ".join(repr(t) for t in candidates)
        raise UnreadableError(
            f"{self.path}: cannot tell the {role} token (no tokenizer_config.json naming it, "
            f"and none of {tried} is in the vocabulary)",
            hint=f'put a tokenizer_config.json with "{role}_token" beside the tokenizer.json',
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from ``*.model`` / ``*.json``, or a directory holding one of them."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory", hint="check the tokenizer path")
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise UsageError(
            f"{path}: holds neither tokenizer.model nor tokenizer.json",
            hint="point --tokenizer at the tokenizer file or the directory that holds it",
        )
    suffix = path.suffix.lower()
    if suffix == ".model":
        return SentencePieceTokenizer(path)
    if suffix == ".json":
        return HFTokenizer(path)
    raise UsageError(
        f"{path}: not a tokenizer file (expected a sentencepiece .model or a tokenizer.json)",
        hint="point --tokenizer at tokenizer.model or tokenizer.json",
    )


def _import_optional(module: str, *, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(
            f"reading this tokenizer needs the {module!r} package, which is not installed",
            hint=f"pip install 'ckpt-doctor[{extra}]'",
        ) from exc


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}", hint="check the tokenizer path") from exc
    if size == 0:
        raise EmptyFileError(
            f"{path}: the tokenizer file is empty (0 bytes)",
            hint="the copy was interrupted; copy the tokenizer file again",
        )


def _corrupt(path: Path, exc: BaseException, kind: str) -> UnreadableError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UnreadableError(
        f"{path}: cannot be read as a {kind} ({first})",
        hint="the file is truncated or corrupt; copy it again from the model's source",
    )


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, exc, "JSON file") from exc
    if not isinstance(config, dict):
        raise UnreadableError(
            f"{path}: expected a JSON object, found {type(config).__name__}",
            hint="the file is truncated or corrupt; copy it again from the model's source",
        )
    return config
