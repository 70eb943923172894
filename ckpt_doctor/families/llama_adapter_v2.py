"""LLaMA-Adapter v2 (OpenGVLab/LLaMA-Adapter), two model lines with their own files.

Chat (llama_adapter_v2_chat65b/): bias-scale-norm tuning. Every linear computes
``W(x * scale) + bias`` with ``w{q,k,v,o}_bias/_scale`` and ``w{1,2,3}_bias/_scale`` on the
attention / feed-forward modules; attention_norm and ffn_norm are trained (the final norm is
not). Optional adapter prompts as v1's, whose keys/values go through wk/wv with their scale and
bias, weighted by tanh(gate) per head, always; only adapted layers keep a gate. Its files hold
the trained tensors under 'model'; chat_demo.py loads ``torch.load(path)['model']`` with
strict=False.

Multimodal (llama_adapter_v2_multimodal7b/): the LLaMA lives under ``llama.``; wq/wo/w1-w3 get
nn.Linear biases, norms are trained (final norm too), optional LoRA (``lora_w*_l1/_l2``) and
``new_gate``, per-head tanh gates, ``adapter_query`` [query_len * query_layer, dim] plus CLIP
visual query tensors. Released adapters are ``{'model': subset, 'config': {w_bias, w_lora,
lora_rank}}``, loaded with strict=False and an assertion that nothing is unexpected.
"""

from ckpt_doctor.families.spec import Family, Gate, Loader, Prompt

GATE = r"layers\.(\d+)\.attention\.gate"
_ANY_GATE = GATE.replace(r"(\d+)", r"\d+")
CHAT_LINEAR = r"layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.w[123])_(?:bias|scale)"
LAYER_NORMS = r"layers\.\d+\.(?:attention|ffn)_norm\.weight"

CHAT = Family(
    name="llama-adapter-v2-chat",
    title="LLaMA-Adapter v2 chat (bias-scale-norm tuning, optional prompts with tanh gates)",
    namespace="meta",
    markers=(CHAT_LINEAR,),
    trained=(CHAT_LINEAR, LAYER_NORMS, r"adapter_query\.weight", _ANY_GATE),
    gate=Gate(GATE, "heads", trained="tanh", inference="tanh"),
    prompt=Prompt(r"adapter_query\.weight", per_layer=False),
    adapted="last",
    loader=Loader(
        code="model.load_state_dict(torch.load(path)['model'], strict=False) (chat_demo.py)",
        container="model",
        unexpected="ignored",
    ),
    runs_here=True,
    source="llama_adapter_v2_chat65b/llama/model.py, models_llama_adapter.py, chat_demo.py",
)

VISUAL = r"(?:visual_query|visual_blocks|visual_proj|visual_proj_norm|clip_proj|clip_proj_norm)\..+"
MM_LINEAR_BIAS = r"layers\.\d+\.(?:attention\.w[qo]|feed_forward\.w[123])\.bias"
MM_LORA = r"layers\.\d+\.(?:attention\.lora_w[qkvo]|feed_forward\.lora_w[123])_l[12]\.weight"

MULTIMODAL = Family(
    name="llama-adapter-v2-multimodal",
    title="LLaMA-Adapter v2 multimodal (llama.* biases and norms, CLIP visual prompts)",
    namespace="meta",
    markers=(VISUAL, MM_LINEAR_BIAS, MM_LORA, r"layers\.\d+\.attention\.new_gate"),
    trained=(
        VISUAL,
        MM_LINEAR_BIAS,
        MM_LORA,
        r"layers\.\d+\.attention\.new_gate",
        LAYER_NORMS,
        r"norm\.weight",
        r"adapter_query\.weight",
        _ANY_GATE,
    ),
    gate=Gate(GATE, "heads", trained="tanh", inference="tanh"),
    prompt=Prompt(r"adapter_query\.weight", per_layer=False),
    adapted="last",
    loader=Loader(
        code="model.load_state_dict(torch.load(path)['model'], strict=False), asserting no "
        "unexpected keys (llama_adapter.py load())",
        container="model",
        unexpected="raises",
        own_prefix="llama.",
    ),
    runs_here=False,
    refusal="its adapter prompts add CLIP image features (visual_query, visual_blocks), so "
    "text-only generation is not what LLaMA-Adapter v2 multimodal runs",
    source="llama_adapter_v2_multimodal7b/llama/llama.py, llama_adapter.py, "
    "util/extract_adapter_from_checkpoint.py",
)

# What its released adapters record under 'config' (llama_adapter.py reads these three).
MULTIMODAL_CONFIG_KEYS = ("w_bias", "w_lora", "lora_rank")
