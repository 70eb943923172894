"""litgpt and lit-llama adapters (Lightning-AI), recognised and read; their models are not the
reference model's.

litgpt (litgpt/adapter.py, adapter_v2.py): from ``adapter_start_layer`` up, each attention has
``adapter_wte`` [prompt_length, n_embd] and ``gating_factor`` [1, 1, n_head, 1], zero-init,
applied raw. adapter_v2 adds ``adapter_bias`` / ``adapter_scale`` to every linear (whose frozen
weight becomes ``<linear>.linear.weight``) and trains norm_1, norm_2, ln_f. Files:
``lit_model.pth.adapter(_v2)`` = {'model': the adapter tensors}, merged into the base checkpoint
and loaded strictly. Its adapter reads the prompt's keys/values from the fused qkv output viewed
per query group, while its qkv weight is laid out [all Q | all K | all V]: the prompt keys and
values are not those of LLaMA-Adapter, so no other family's file reproduces what it computes.

lit-llama (lit_llama/adapter.py, adapter_v2.py): the same names on its own model (fused
``c_attn`` split into q, k, v; ``rms_1``/``rms_2``), ``gating_factor`` [1, n_head, 1, 1] (older
files: a scalar), flat files loaded with strict=False. Its math is LLaMA-Adapter v1's with raw
per-head gates on the layers from ``adapter_start_layer`` up.
"""

from ckpt_doctor.families.spec import Family, Gate, Loader, Prompt

PROMPT = r"transformer\.h\.(\d+)\.attn\.adapter_wte\.weight"
GATE = r"transformer\.h\.(\d+)\.attn\.gating_factor"
_V1_KEYS = r"transformer\.h\.\d+\.attn\.(?:adapter_wte\.weight|gating_factor)"
_BIAS_SCALE = r"(?:transformer\.h\.\d+\.\w+\.\w+|lm_head)\.adapter_(?:bias|scale)"
_NOT_HERE = (
    "its own model (fused qkv projection, {names} names) is not the reference model's; "
    "use it with {library}"
)
_WHY_NOT_LITGPT = (
    "litgpt's adapter reads the prompt keys/values from rows of its fused qkv projection that "
    "are not the key/value rows (qkv is laid out [Q|K|V], the adapter splits it per query "
    "group), so no LLaMA-Adapter or PEFT file computes the same"
)

LITGPT_ADAPTER = Family(
    name="litgpt-adapter",
    title="litgpt adapter (adapter_wte + gating_factor per layer from adapter_start_layer)",
    namespace="litgpt",
    markers=(_V1_KEYS,),
    trained=(_V1_KEYS,),
    gate=Gate(GATE, "heads-last", trained="raw", inference="raw"),
    prompt=Prompt(PROMPT, per_layer=True),
    adapted="from_start",
    loader=Loader(
        code="checkpoint.update(adapter.get('model', adapter)); model.load_state_dict(checkpoint)",
        container="model",
        unexpected="raises",
    ),
    runs_here=False,
    refusal=_NOT_HERE.format(names="transformer.h.N", library="litgpt")
    + "; and "
    + _WHY_NOT_LITGPT,
    source="litgpt/adapter.py, litgpt/generate/adapter.py, litgpt/finetune/adapter.py",
)

_V2_NORMS = r"transformer\.(?:h\.\d+\.norm_[12]|ln_f)\.(?:weight|bias)"
LITGPT_ADAPTER_V2 = Family(
    name="litgpt-adapter-v2",
    title="litgpt adapter_v2 (adapter + adapter_bias/adapter_scale on every linear, trained norms)",
    namespace="litgpt",
    markers=(_BIAS_SCALE,),
    trained=(_V1_KEYS, _BIAS_SCALE, _V2_NORMS),
    gate=LITGPT_ADAPTER.gate,
    prompt=LITGPT_ADAPTER.prompt,
    adapted="from_start",
    loader=LITGPT_ADAPTER.loader,
    runs_here=False,
    refusal=LITGPT_ADAPTER.refusal,
    source="litgpt/adapter_v2.py, litgpt/generate/adapter_v2.py",
)

LIT_LLAMA_ADAPTER = Family(
    name="lit-llama-adapter",
    title="lit-llama adapter (adapter_wte + per-head gating_factor from adapter_start_layer)",
    namespace="lit-llama",
    markers=(_V1_KEYS,),
    trained=(_V1_KEYS,),
    gate=Gate(GATE, "heads", trained="raw", inference="raw"),
    prompt=LITGPT_ADAPTER.prompt,
    adapted="from_start",
    loader=Loader(
        code="model.load_state_dict(torch.load(path), strict=False) (generate/adapter.py)",
        container=None,
        unexpected="ignored",
    ),
    runs_here=False,
    refusal=_NOT_HERE.format(names="transformer.h.N.attn.c_attn", library="lit-llama"),
    source="lit_llama/adapter.py, generate/adapter.py",
)

_LIT_LLAMA_V2_NORMS = r"transformer\.(?:h\.\d+\.rms_[12]|ln_f)\.scale"
LIT_LLAMA_ADAPTER_V2 = Family(
    name="lit-llama-adapter-v2",
    title="lit-llama adapter_v2 (adapter + adapter_bias/adapter_scale, trained RMSNorm scales)",
    namespace="lit-llama",
    markers=(_BIAS_SCALE,),
    trained=(_V1_KEYS, _BIAS_SCALE, _LIT_LLAMA_V2_NORMS),
    gate=LIT_LLAMA_ADAPTER.gate,
    prompt=LITGPT_ADAPTER.prompt,
    adapted="from_start",
    loader=LIT_LLAMA_ADAPTER.loader,
    runs_here=False,
    refusal=LIT_LLAMA_ADAPTER.refusal,
    source="lit_llama/adapter_v2.py",
)
