"""HF PEFT adaption prompt (peft/tuners/adaption_prompt/): in each of the last
``adapter_layers`` attention modules, ``adaption_prompt`` [1, adapter_len, hidden] and a scalar
``adaption_gate`` [1], zero-init, trained and applied raw. The prompt's keys/values go through
the frozen k_proj / v_proj without RoPE and get their own fp32 softmax: LLaMA-Adapter v1's math
with one gate shared by all heads. Saved by save_pretrained as adapter_model.safetensors
(``base_model.model.model.layers.N.self_attn.adaption_prompt``) + adapter_config.json
(peft_type ADAPTION_PROMPT, adapter_len, adapter_layers, target_modules); loaded by
PeftModel.from_pretrained with strict=False (a name that does not match loads nothing)."""

from ckpt_doctor.families.spec import Family, Gate, Loader, Prompt

PROMPT = r"layers\.(\d+)\.attention\.adaption_prompt"
GATE = r"layers\.(\d+)\.attention\.adaption_gate"
TENSOR = r"layers\.(\d+)\.attention\.adaption_(prompt|gate)"  # group 2: which one
PEFT_TYPE = "ADAPTION_PROMPT"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")

ADAPTION_PROMPT = Family(
    name="peft-adaption-prompt",
    title="HF PEFT adaption prompt (adaption_prompt [1, L, hidden] + scalar adaption_gate per "
    "adapted layer)",
    namespace="hf",
    markers=(r"layers\.\d+\.attention\.adaption_(?:prompt|gate)",),
    trained=(r"layers\.\d+\.attention\.adaption_(?:prompt|gate)",),
    gate=Gate(GATE, "scalar", trained="raw", inference="raw"),
    prompt=Prompt(PROMPT, per_layer=True),
    adapted="last",
    loader=Loader(
        code="PeftModel.from_pretrained(model, dir): set_peft_model_state_dict, "
        "load_state_dict(strict=False)",
        container=None,
        unexpected="ignored",
        own_prefix="base_model.model.",
    ),
    runs_here=True,
    source="peft/tuners/adaption_prompt/layer.py, config.py, model.py; peft/utils/save_and_load.py",
)


def own_name(layer: int, which: str) -> str:
    """The name PEFT's save_pretrained gives a LLaMA layer's adaption tensor."""
    return f"base_model.model.model.layers.{layer}.self_attn.adaption_{which}"
