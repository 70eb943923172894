"""The adapter a checkpoint holds: its family, its tensors, its prompt length and adapted layers,
with where each number came from (training args, adapter_config.json, metadata, shapes).

Pure functions over handle metadata, except the gates (a few bytes) read to tell trained layers
from untouched ones when nothing else says how many layers are adapted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpt_doctor.directories import read_json_object
from ckpt_doctor.errors import UnreadableError
from ckpt_doctor.families import PEFT_LORA, UNKNOWN, Family, detect_family, peft_lora, unexplained
from ckpt_doctor.families.llama_adapter_v1 import QUERY_KEY
from ckpt_doctor.families.llama_adapter_v2 import MULTIMODAL
from ckpt_doctor.handles import TensorHandle

if TYPE_CHECKING:
    from ckpt_doctor.reader import Checkpoint


@dataclass(frozen=True)
class LoraInfo:
    """A PEFT LoRA as found: its modules (A/B pairs) and the adapter_config.json that gives its
    alpha and targets (beside the file, or in the run's output dir above a checkpoint-N/)."""

    modules: dict[str, peft_lora.Module]
    config: dict[str, Any] | None
    config_path: str | None
    refusal: str  # why the reference model does not run it ("" when it does)

    @property
    def settings(self) -> peft_lora.Settings | None:
        return peft_lora.Settings.from_json(self.config)

    def scale(self, module: str) -> float | None:
        """PEFT's scale for the module, with the rank its tensors have."""
        settings, found = self.settings, self.modules.get(module)
        if settings is None or found is None or not found.rank:
            return None
        return settings.scale(module, found.rank)

    def to_json(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "modules": len(self.modules),
            "ranks": sorted({m.rank for m in self.modules.values() if m.rank}),
            "r": settings.r if settings else None,
            "lora_alpha": settings.lora_alpha if settings else None,
            "use_rslora": settings.use_rslora if settings else None,
            "config": self.config_path,
            "refusal": self.refusal or None,
        }


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter as found: its family, config, where each number came from, its tensors."""

    family: Family
    keys: tuple[str, ...]  # the tensors its family trains, as found (canonical names)
    adapter_len: int | None  # prompt length; None: unknown, or no prompt
    adapter_layer: int | None  # adapted layers; 0: no prompt (v2 chat bias-scale-norm only)
    source: str
    query_shape: tuple[int, ...] | None  # the stacked prompt's shape, or one per-layer prompt's
    gate_layers: dict[int, str]
    prompt_layers: dict[int, str] = field(default_factory=dict)  # per-layer prompt families
    args_len: int | None = None
    args_layer: int | None = None
    # When the config came from shapes: the adapter_layer values the rows were tried against
    # (args, metadata, trained gates); empty when nothing says how many layers are adapted.
    layer_candidates: tuple[int, ...] = ()
    lora: LoraInfo | None = None  # PEFT LoRA only

    @property
    def has_prompt(self) -> bool:
        return self.query_shape is not None

    def adapted_layers(self, n_layers: int | None) -> list[int]:
        """Where the prompts go: per-layer prompts say it themselves; a stacked prompt covers
        the last adapter_layer layers (j = 0 is layer n_layers - adapter_layer)."""
        if self.prompt_layers:
            return list(self.prompt_layers)
        if not n_layers or not self.adapter_layer or self.adapter_layer > n_layers:
            return []
        return list(range(n_layers - self.adapter_layer, n_layers))

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "adapter_len": self.adapter_len,
            "adapter_layer": self.adapter_layer,
            "source": self.source,
            "query_shape": list(self.query_shape) if self.query_shape else None,
            "gate_layers": list(self.gate_layers),
            "prompt_layers": list(self.prompt_layers),
            "tensors": len(self.keys),
            "args": {"adapter_len": self.args_len, "adapter_layer": self.args_layer},
            **({"lora": self.lora.to_json()} if self.lora is not None else {}),
        }


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def checkpoint_family(ckpt: Checkpoint) -> Family | None:
    """The family of an opened checkpoint (names, saved names, the key its weights sit under)."""
    container = ckpt.container_path[0] if ckpt.container_path else None
    found = detect_family(ckpt.canonical(), saved=ckpt.tensors, container=container)
    if found is None and not ckpt.tensors and lora_config(ckpt)[0] is not None:
        return PEFT_LORA  # an empty adapter_model.bin beside a LoRA adapter_config.json
    return found


def lora_config(ckpt: Checkpoint) -> tuple[dict[str, Any] | None, str | None]:
    """A LoRA adapter_config.json for the file and where it was found: beside it (an adapter
    directory), else in the folder above (a Trainer run's output_dir holds it, and its
    checkpoint-N/ the weights)."""
    own = getattr(ckpt, "adapter_json", None)
    if own is not None:
        lora = own.get("peft_type") in (None, peft_lora.PEFT_TYPE)
        folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        return (own, str(folder / peft_lora.CONFIG_FILE)) if lora else (None, None)
    folder = ckpt.path.parent if ckpt.path.is_dir() else ckpt.path.parent.parent
    path = folder / peft_lora.CONFIG_FILE
    if not path.is_file():
        return None, None
    try:  # read as the directory readers read their JSON: bounded, the right shape
        config = read_json_object(path, directory=folder)
    except UnreadableError:
        return None, None
    if config.get("peft_type") != peft_lora.PEFT_TYPE:
        return None, None
    return config, str(path)


def checkpoint_adapter(ckpt: Checkpoint, *, family: Family | None = None) -> AdapterConfig | None:
    """adapter_config for an opened checkpoint: its args (training) or adapter_config.json."""
    family = family or checkpoint_family(ckpt)
    if family is PEFT_LORA:
        config, where = lora_config(ckpt)
        return lora_adapter(ckpt.canonical(), config=config, config_path=where)
    args = ckpt.args if ckpt.args is not None else getattr(ckpt, "adapter_json", None)
    return adapter_config(ckpt.canonical(), args=args, metadata=ckpt.metadata, family=family)


def adapter_config(
    tensors: Mapping[str, TensorHandle],
    *,
    args: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    family: Family | None = None,
) -> AdapterConfig | None:
    """The adapter's config from args / adapter_config.json / metadata, else from shapes (and,
    for v1, from which gates were trained)."""
    family = family or detect_family(tensors)
    if family is None:
        return None
    if family is UNKNOWN:
        return AdapterConfig(family, tuple(unexplained(tensors)), None, None, "names", None, {})
    if family is PEFT_LORA:
        return lora_adapter(tensors, config=dict(args) if args else None, config_path=None)
    found_keys = tuple(family.trained_keys(tensors))
    gates = family.gate_layers(tensors)
    a_len = _int_or_none((args or {}).get("adapter_len"))
    # PEFT's adapter_config.json says adapter_layers; LLaMA-Adapter's args adapter_layer.
    a_layer = _int_or_none((args or {}).get("adapter_layer", (args or {}).get("adapter_layers")))
    if family.prompt is not None and family.prompt.per_layer:
        return _per_layer(family, tensors, found_keys, gates, a_len, a_layer)
    query = tensors.get(QUERY_KEY)
    if query is None:  # v2 chat without prompts: bias, scale and norms only
        return AdapterConfig(family, found_keys, None, 0, "no prompt", None, gates, {}, a_len)
    rows = query.shape[0] if len(query.shape) == 2 else None
    m_len = _int_or_none((metadata or {}).get("adapter_len"))
    m_layer = _int_or_none((metadata or {}).get("adapter_layer"))

    def fits(length: int | None, layer: int | None) -> bool:
        return bool(length and layer and rows is not None and length * layer == rows)

    candidates: tuple[int, ...] = ()
    if fits(a_len, a_layer):
        adapter_len, adapter_layer, source = a_len, a_layer, "args"
    elif fits(m_len, m_layer):
        adapter_len, adapter_layer, source = m_len, m_layer, "metadata"
    else:
        adapter_len, adapter_layer, source = None, None, "shapes"
        candidates = tuple(
            dict.fromkeys(x for x in (a_layer, m_layer, *_layers(family, tensors, gates)) if x)
        )
        for layer in candidates:
            if rows and rows % layer == 0:
                adapter_len, adapter_layer = rows // layer, layer
                break
    return AdapterConfig(
        family,
        found_keys,
        adapter_len,
        adapter_layer,
        source,
        tuple(query.shape),
        gates,
        {},
        a_len,
        a_layer,
        candidates,
    )


def lora_adapter(
    tensors: Mapping[str, TensorHandle], *, config: dict[str, Any] | None, config_path: str | None
) -> AdapterConfig:
    """A PEFT LoRA: its A/B pairs by module, its config (alpha, targets) and what stops the
    reference model running it exactly."""
    names = list(tensors)
    found = peft_lora.modules({n: tuple(tensors[n].shape) for n in names})
    info = LoraInfo(found, config, config_path, peft_lora.refusal(config, names))
    source = "adapter_config.json" if config else "shapes"
    keys = tuple(PEFT_LORA.trained_keys(names))
    return AdapterConfig(PEFT_LORA, keys, None, None, source, None, {}, lora=info)


def _layers(
    family: Family, tensors: Mapping[str, TensorHandle], gates: dict[int, str]
) -> list[int]:
    """How many layers a stacked prompt covers, from the tensors: v1 writes a gate for every
    layer (the trained ones are the top nonzero run), v2 chat keeps only the adapted layers'
    gates, v2 multimodal's visual_query has query_len rows."""
    if family is MULTIMODAL:
        visual = tensors.get("visual_query.weight")
        query = tensors[QUERY_KEY]
        length = visual.shape[0] if visual is not None and len(visual.shape) == 2 else 0
        return [query.shape[0] // length] if length and query.shape[0] % length == 0 else []
    if family.name == "llama-adapter-v2-chat":
        return [len(gates)] if gates else []
    return [_trailing_nonzero_gates(tensors, gates)]


def _per_layer(
    family: Family,
    tensors: Mapping[str, TensorHandle],
    found_keys: tuple[str, ...],
    gates: dict[int, str],
    a_len: int | None,
    a_layer: int | None,
) -> AdapterConfig:
    """Families with a prompt per layer ([1, L, dim] for PEFT, [L, dim] for litgpt)."""
    prompts = family.prompt_layers(tensors)
    shapes = {tuple(tensors[k].shape) for k in prompts.values()}
    shape = shapes.pop() if len(shapes) == 1 else None
    length = shape[-2] if shape and len(shape) >= 2 else None
    return AdapterConfig(
        family,
        found_keys,
        length,
        len(prompts) or None,
        "shapes",
        shape,
        gates,
        prompts,
        a_len,
        a_layer,
    )


def _trailing_nonzero_gates(tensors: Mapping[str, TensorHandle], gates: dict[int, str]) -> int:
    """How many top layers have a nonzero gate: the layers training actually adapted."""
    count = 0
    for layer in sorted(gates, reverse=True):
        if not tensors[gates[layer]].values().any():
            break
        count += 1
    return count
