"""The naive checkpoint diff people usually write: load both files fully, compare key by key.

This is the baseline for ``diff_memory.py``. It deliberately does what a typical script does:
``torch.load`` without ``mmap``, so every tensor of both checkpoints is materialised in anonymous
memory. Human-readable lines go to stderr; one JSON document goes to stdout:
``{"changed": [...], "added": [...], "removed": [...], "max_abs": {name: float|null}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch


def load_full(path: str) -> Any:
    # weights_only=True is the safe default; LLaMA-Adapter training checkpoints pickle their
    # argparse.Namespace of training args, so that one class must be allowed explicitly.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def state_dict_of(obj: Any) -> dict[str, torch.Tensor]:
    # Training checkpoints wrap the weights as {'model': state_dict, 'optimizer': ..., ...}.
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def diff(finetuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, Any]:
    added = sorted(set(finetuned) - set(base))
    removed = sorted(set(base) - set(finetuned))
    changed: list[str] = []
    max_abs: dict[str, float | None] = {}
    for name in sorted(set(finetuned) & set(base)):
        a, b = finetuned[name], base[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            changed.append(name)
            max_abs[name] = None  # not comparable element-wise
            print(
                f"modified {name}: {tuple(b.shape)} {b.dtype} -> {tuple(a.shape)} {a.dtype}",
                file=sys.stderr,
            )
            continue
        if not torch.equal(a, b):
            changed.append(name)
            d = (a.float() - b.float()).abs().max().item()
            max_abs[name] = d
            print(f"modified {name}: max|a-b| = {d:.6g}", file=sys.stderr)
    for name in added:
        print(f"added    {name}: {tuple(finetuned[name].shape)}", file=sys.stderr)
    for name in removed:
        print(f"removed  {name}: {tuple(base[name].shape)}", file=sys.stderr)
    return {"changed": changed, "added": added, "removed": removed, "max_abs": max_abs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Naive diff of a fine-tuned checkpoint against its base (loads both fully)."
    )
    ap.add_argument("finetuned", help="fine-tuned checkpoint (flat state dict or {'model': ...})")
    ap.add_argument("base", help="base checkpoint")
    args = ap.parse_args(argv)
    ft = state_dict_of(load_full(args.finetuned))
    base = state_dict_of(load_full(args.base))
    json.dump(diff(ft, base), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
