"""LLaMA-Adapter v1 (OpenGVLab/LLaMA-Adapter: llama/model.py, example.py,
alpaca_finetuning_v1/): one stacked prompt ``adapter_query.weight`` [adapter_layer *
adapter_len, dim] for the last adapter_layer layers, and a zero-init per-head gate
[1, H, 1, 1] in every layer (checkpoints before 2023-04-15: a scalar [1]). Training applies
tanh to the gate, upstream inference uses it raw (upstream issue #39), so --gate picks."""

from ckpt_doctor.families.spec import Family, Gate, Loader, Prompt

QUERY_KEY = "adapter_query.weight"
GATE_PATTERN = r"layers\.(\d+)\.attention\.gate"

FAMILY = Family(
    name="llama-adapter-v1",
    title="LLaMA-Adapter v1 (adapter_query prompt + per-layer zero-init gates)",
    namespace="meta",
    markers=(r"adapter_query\.weight", GATE_PATTERN.replace(r"(\d+)", r"\d+")),
    trained=(r"adapter_query\.weight", GATE_PATTERN.replace(r"(\d+)", r"\d+")),
    gate=Gate(GATE_PATTERN, "heads", trained="tanh", inference="raw", switchable=True),
    prompt=Prompt(r"adapter_query\.weight", per_layer=False),
    adapted="last",
    loader=Loader(
        code="model.load_state_dict(torch.load(path), strict=False) (example.py)",
        container=None,
        unexpected="ignored",
    ),
    runs_here=True,
    source="llama/model.py, example.py, alpaca_finetuning_v1/llama/model.py",
)


def gate_key(layer: int) -> str:
    return f"layers.{layer}.attention.gate"
