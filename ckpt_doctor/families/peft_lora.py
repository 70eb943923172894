"""HF PEFT LoRA (peft/tuners/lora/layer.py, config.py, model.py; peft/utils/save_and_load.py).

Each targeted linear W [out, in] gets ``lora_A`` [r, in] (Kaiming-init) and ``lora_B`` [out, r]
(zero-init: an untrained LoRA changes nothing) and computes ``W x + scale * B (A x)``, which
merged is ``W' = W + scale * (B @ A)``; scale = lora_alpha / r, or lora_alpha / sqrt(r) with
use_rslora, where rank_pattern / alpha_pattern override r / lora_alpha per module (the first
pattern p with ``re.match(rf"(.*\\.)?({p})$", module)``). fan_in_fan_out is reset to False for
an nn.Linear (LLaMA's every linear), so it changes nothing here.

Names across PEFT versions (after the ``base_model.model.`` of its wrapper):
- saved adapter files (``save_pretrained``, every version): ``<linear>.lora_A.weight``;
- a live PeftModel's state dict: ``<linear>.lora_A.<adapter>.weight`` since PEFT 0.3 (adapter
  name "default"), ``<linear>.lora_A.weight`` before; the frozen weight is
  ``<linear>.base_layer.weight`` since PEFT 0.7, ``<linear>.weight`` before (keys.WRAPPED_RENAMES).
Loaded by PeftModel.from_pretrained: set_peft_model_state_dict maps the file's names to the
model's and calls load_state_dict(strict=False): a name it does not match loads nothing.

The alpaca-lora save bug: its ``model.state_dict`` override returned
get_peft_model_state_dict's output, which save_pretrained filtered again by adapter name: no
key survived, and adapter_model.bin is an empty dict (443 bytes with the torch of the day).
The trained weights are still in the Trainer's checkpoint-N/ (the whole PeftModel state dict).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ckpt_doctor import keys
from ckpt_doctor.families.spec import Family, Loader

PEFT_TYPE = "LORA"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# Where a Trainer run keeps the whole PeftModel state dict.
TRAINER_WEIGHTS = ("pytorch_model.bin", "model.safetensors", "model.safetensors.index.json")

LINEAR = r"layers\.(\d+)\.(?:attention\.w[qkvo]|feed_forward\.w[123])|output"
PAIR = rf"({LINEAR})\.lora_(A|B)\.weight"  # groups: module, layer (or None), A / B
_ANY_PAIR = (
    r"(?:layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.w[123])|output)\.lora_[AB]\.weight"
)
# LoRA forms whose math is not W + scale * B @ A on a linear: named, and refused to run.
VARIANTS: dict[str, str] = {
    r".+\.lora_magnitude_vector": "DoRA (use_dora: a learned per-row magnitude rescales the "
    "merged weight)",
    r".+\.lora_embedding_[AB]": "LoRA on the embedding",
    r".+\.lora_B\.bias": "lora_bias (a trained bias on B)",
    r".+\.lora_E\.weight": "AdaLoRA's SVD form (lora_E)",
}
# adapter_config.json settings that change what the adapter computes: refused, with the reason.
REFUSED_SETTINGS: dict[str, str] = {
    "use_dora": "DoRA (use_dora) rescales each row of the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to B",
    "modules_to_save": "modules_to_save replaces whole modules ({value}) with trained copies",
    "use_qalora": "QA-LoRA pools the input before A",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "layer_replication": "layer_replication duplicates layers of the base",
    "target_parameters": "target_parameters puts LoRA on raw parameters, not linears",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "megatron_config": "Megatron's parallel linears",
}
# init_lora_weights that rewrite the base weights at init: the saved adapter fits that base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "mica")

FAMILY = Family(
    name="peft-lora",
    title="HF PEFT LoRA (lora_A [r, in] + lora_B [out, r] on the targeted linears)",
    namespace="hf",
    markers=(_ANY_PAIR, *VARIANTS),
    trained=(_ANY_PAIR, *VARIANTS),
    gate=None,
    prompt=None,
    adapted="last",
    loader=Loader(
        code="PeftModel.from_pretrained(model, dir): set_peft_model_state_dict, "
        "load_state_dict(strict=False)",
        container=None,
        unexpected="ignored",
        own_prefix=PREFIX,
    ),
    runs_here=True,
    source="peft/tuners/lora/layer.py, config.py, model.py; peft/utils/save_and_load.py",
)


def hf_module(module: str) -> str:
    """The HF module name of a canonical one: layers.3.attention.wq -> model.layers.3.self_attn
    .q_proj; output -> lm_head."""
    if module == "output":
        return "lm_head"
    layer, _, rest = module.removeprefix("layers.").partition(".")
    hf = next(h for h, m in keys.HF_LINEARS if m == rest)
    return f"model.layers.{layer}.{hf}"


def linears(n_layers: int) -> list[str]:
    """Every linear of a LLaMA with n_layers layers (canonical module names), output last."""
    per_layer = [f"attention.w{w}" for w in "qkvo"] + [f"feed_forward.w{w}" for w in "123"]
    return [f"layers.{i}.{m}" for i in range(n_layers) for m in per_layer] + ["output"]


def hf_base_names(n_layers: int) -> list[str]:
    """A LlamaForCausalLM's parameter names (what a PeftModel wraps under base_model.model.)."""
    per_layer = [f"{hf}.weight" for hf, _ in keys.HF_LINEARS]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names = [f"model.layers.{i}.{s}" for i in range(n_layers) for s in per_layer]
    return ["model.embed_tokens.weight", *names, "model.norm.weight", "lm_head.weight"]


def own_name(canonical: str) -> str:
    """The name PEFT's save_pretrained gives a LoRA tensor (canonical name in)."""
    m = re.fullmatch(PAIR, canonical)
    if m is None:
        raise ValueError(f"not a LoRA tensor: {canonical}")
    return f"{PREFIX}{hf_module(m.group(1))}.lora_{m.group(3)}.weight"


@dataclass(frozen=True)
class Module:
    """One adapted linear: its A and B (canonical names) and shapes."""

    name: str  # canonical module name: layers.N.attention.wq, output
    a: str | None
    b: str | None
    rank: int | None  # A's rows (B's columns when A is missing)
    shape: tuple[int, int] | None  # (out, in) of W from B and A


def modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Module]:
    """Canonical module name -> its LoRA pair, from the tensors' names and shapes."""
    found: dict[str, dict[str, str]] = {}
    for name in shapes:
        m = re.fullmatch(PAIR, name)
        if m:
            found.setdefault(m.group(1), {})[m.group(3)] = name
    out = {}
    for module, pair in sorted(found.items(), key=lambda kv: _order(kv[0])):
        a, b = pair.get("A"), pair.get("B")
        sa = shapes[a] if a else None
        sb = shapes[b] if b else None
        rank = sa[0] if sa and len(sa) == 2 else sb[1] if sb and len(sb) == 2 else None
        shape = (sb[0], sa[1]) if sa and sb and len(sa) == 2 and len(sb) == 2 else None
        out[module] = Module(module, a, b, rank, shape)
    return out


def _order(module: str) -> tuple[int, str]:
    layer = keys.layer_index(module + ".weight")
    return (layer if layer is not None else 10**9, module)


@dataclass(frozen=True)
class Settings:
    """What adapter_config.json says about the LoRA math and where it goes."""

    r: int | None
    lora_alpha: float | None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    peft_type: str | None = None

    @classmethod
    def from_json(cls, config: dict[str, Any] | None) -> Settings | None:
        if not config:
            return None
        return cls(
            r=config.get("r"),
            lora_alpha=config.get("lora_alpha"),
            use_rslora=bool(config.get("use_rslora")),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            target_modules=config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            layers_to_transform=config.get("layers_to_transform"),
            layers_pattern=config.get("layers_pattern"),
            peft_type=config.get("peft_type"),
        )

    def rank(self, module: str) -> int | None:
        return _pattern(self.rank_pattern, hf_module(module), self.r)

    def alpha(self, module: str) -> float | None:
        return _pattern(self.alpha_pattern, hf_module(module), self.lora_alpha)

    def scale(self, module: str, rank: int) -> float | None:
        """PEFT's scaling for the module with this rank (its config's alpha)."""
        alpha = self.alpha(module)
        if alpha is None or not rank:
            return None
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether PEFT wraps this module (check_target_module_exists, for LLaMA's names)."""
        key = hf_module(module)
        if _listed(self.exclude_modules, key):
            return False
        if self.target_modules == "all-linear":  # every linear but the output layer
            return module != "output"
        if not _listed(self.target_modules, key):
            return False
        layers = self.layers_to_transform
        if layers is None or isinstance(self.target_modules, str) or layers == []:
            return True
        index = keys.layer_index(module + ".weight")
        return index is not None and (
            index == layers if isinstance(layers, int) else index in layers
        )


def _listed(targets: list[str] | str | None, key: str) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _pattern(patterns: dict[str, Any], key: str, default: Any) -> Any:
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def refusal(config: dict[str, Any] | None, names: list[str]) -> str:
    """Why the reference model does not run this LoRA exactly ("" when it does)."""
    for pattern, why in VARIANTS.items():
        hit = next((n for n in names if re.fullmatch(pattern, n)), None)
        if hit is not None:
            return f"{hit}: {why}"
    config = config or {}
    if config.get("peft_type") not in (None, PEFT_TYPE):
        return f"adapter_config.json says peft_type {config['peft_type']}, not LoRA"
    for key, why in REFUSED_SETTINGS.items():
        value = config.get(key)
        if value not in (None, False, [], {}, ""):
            return f"{key}: {why.format(value=value)}"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        return (
            f"init_lora_weights={init!r} rewrites the base weights at init: the adapter fits "
            "that rewritten base, not this one"
        )
    return ""
