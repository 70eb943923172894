"""How each family's own code expects an adapter file to look, and writing one that way.

- LLaMA-Adapter v1, lit-llama: a flat state dict (``.pth``; v1 also ``.safetensors``, which
  carries ckpt-doctor's metadata);
- LLaMA-Adapter v2 chat, litgpt: ``{'model': state_dict}`` (their loaders index ['model']);
- LLaMA-Adapter v2 multimodal: ``{'model': state_dict, 'config': {w_bias, w_lora, lora_rank}}``;
- PEFT: a directory with ``adapter_model.safetensors`` (or ``.bin``) and ``adapter_config.json``.
Every file goes through atomic.write_atomically: readers see the old state or the whole file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ckpt_doctor import keys
from ckpt_doctor.atomic import check_destination, write_atomically
from ckpt_doctor.errors import UsageError
from ckpt_doctor.families import PEFT_LORA, Family, peft, peft_lora
from ckpt_doctor.families.llama_adapter_v2 import CHAT, MM_LORA, MULTIMODAL

FORMATS = ("pth", "safetensors")
Kind = Literal["flat", "model", "model+config", "peft-dir"]


@dataclass(frozen=True)
class Layout:
    kind: Kind
    formats: tuple[str, ...]  # what its own loader can read

    @property
    def torch_only(self) -> bool:
        return self.formats == ("pth",)


def layout_for(family: Family | None) -> Layout:
    if family in (peft.ADAPTION_PROMPT, PEFT_LORA):
        return Layout("peft-dir", FORMATS)
    if family is MULTIMODAL:
        return Layout("model+config", ("pth",))
    if family is not None and (family is CHAT or family.loader.container == "model"):
        return Layout("model", ("pth",))
    if family is not None and family.namespace == "lit-llama":
        return Layout("flat", ("pth",))
    return Layout("flat", FORMATS)


def own_name(family: Family | None, canonical: str, saved: str) -> str:
    """The name the family's own code expects for a tensor: PEFT's adaption tensors under its
    wrapper's names, v2 multimodal's LLaMA under ``llama.``, Meta names for LLaMA-Adapter;
    otherwise the saved name without wrappers or another family's prefix. A tensor saved under
    an HF name keeps it (its rows are in HF's layout)."""
    m = re.fullmatch(peft.TENSOR, canonical)
    if family is peft.ADAPTION_PROMPT and m:
        return peft.own_name(int(m.group(1)), m.group(2))
    if family is PEFT_LORA and re.fullmatch(peft_lora.PAIR, canonical):
        return peft_lora.own_name(canonical)  # the adapter name ("default") dropped
    if keys.hf_to_meta(keys.model_name(saved)) is not None or family is None:
        return keys.own_name(saved, family.loader.own_prefix if family else "")
    if family is MULTIMODAL and (keys.is_base_key(canonical) or canonical.startswith("layers.")):
        return family.loader.own_prefix + canonical  # its LLaMA is the module .llama
    if family.namespace == "meta":
        return canonical
    return keys.own_name(saved, family.loader.own_prefix)


@dataclass(frozen=True)
class Destination:
    path: Path  # what -o named: the file, or the PEFT directory
    format: str
    files: tuple[Path, ...]  # the files written, weights first


def destination(out: Path, family: Family | None, fmt: str | None) -> Destination:
    """Check -o / --format against the family's layout: the name must not lie about the
    format (torch.load on safetensors bytes fails), and a PEFT adapter is a directory."""
    layout = layout_for(family)
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint="use --format pth or safetensors")
    if layout.kind == "peft-dir":
        if out.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            raise UsageError(
                f"{out.name}: a PEFT adapter is a directory (adapter_model.safetensors + "
                "adapter_config.json), which PeftModel.from_pretrained reads",
                hint=f"pass -o {out.with_suffix('')} (a directory)",
            )
        fmt = fmt or "safetensors"
        weights = peft.WEIGHTS_FILES[0 if fmt == "safetensors" else 1]
        return Destination(out, fmt, (out / weights, out / peft.CONFIG_FILE))
    if fmt is None:
        fmt = "safetensors" if out.suffix == ".safetensors" else "pth"
    if (fmt == "safetensors") != (out.suffix == ".safetensors"):
        raise UsageError(
            f"--format {fmt} but the output is named {out.name}",
            hint="name a safetensors file *.safetensors and a pth file anything else",
        )
    if fmt not in layout.formats:
        name = family.name if family is not None else "this adapter"
        raise UsageError(
            f"{name} is loaded with torch.load by its own code; a .safetensors file would not "
            "load there",
            hint=f"write a .pth (-o {out.with_suffix('.pth').name})",
        )
    return Destination(out, fmt, (out,))


def check(dest: Destination, *, force: bool, sources: list[Path]) -> None:
    """Refuse to overwrite without --force, and never overwrite an input (atomic.py's rules,
    for each file of a directory layout)."""
    if dest.files == (dest.path,):
        check_destination(dest.path, force=force, sources=sources)
        return
    if dest.path.exists() and not dest.path.is_dir():
        raise UsageError(f"{dest.path} is a file", hint="pass a directory for the adapter")
    if not dest.path.parent.exists():
        raise UsageError(f"{dest.path.parent} does not exist", hint="create the directory first")
    if dest.path.is_dir():
        for f in dest.files:
            check_destination(f, force=force, sources=sources)


def write(
    dest: Destination,
    family: Family | None,
    tensors: Mapping[str, Any],
    *,
    metadata: Mapping[str, str],
    peft_config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``tensors`` (torch tensors under the family's own names) in its layout."""
    layout = layout_for(family)
    state = dict(tensors)
    if dest.files != (dest.path,) and not dest.path.exists():
        dest.path.mkdir()
    weights = dest.files[0]
    if layout.kind == "model":
        obj: Any = {"model": state}
    elif layout.kind == "model+config":
        obj = {"model": state, "config": multimodal_config(state)}
    else:
        obj = state
    write_atomically(weights, lambda tmp: _save(obj, tmp, dest.format, metadata))
    if layout.kind == "peft-dir":
        text = json.dumps(dict(peft_config or {}), indent=2, sort_keys=True) + "\n"
        write_atomically(dest.files[1], lambda tmp: tmp.write_text(text))


def multimodal_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """What LLaMA-Adapter v2 multimodal's released adapters record (llama_adapter.py reads it
    to build the model): bias tuning, LoRA and its rank, from the tensors themselves."""
    lora = [
        t
        for n, t in state.items()
        if re.fullmatch(MM_LORA, n.removeprefix("llama.")) and n.endswith("_l1.weight")
    ]
    return {
        "w_bias": any(n.endswith(".bias") and n.startswith("llama.") for n in state),
        "w_lora": bool(lora),
        "lora_rank": int(lora[0].shape[0]) if lora else 16,
    }


def _save(obj: Any, path: Path, fmt: str, metadata: Mapping[str, str]) -> None:
    import torch

    if fmt == "safetensors":
        # In place: the library's save_file writes beside its target and renames, which an
        # O_TMPFILE's /proc/self/fd path cannot take (see safetensors_format).
        from ckpt_doctor.safetensors_format import save as save_file

        save_file(obj, str(path), metadata=dict(metadata))
    else:
        torch.save(obj, path)
