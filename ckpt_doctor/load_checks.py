"""How the file loads with its family's own code, as saved: CONTAINER_NESTED, LOAD_NOTHING,
LOAD_FAILS, KEY_PREFIX. Pure functions of the checkpoint's names (upstream_load.own_load)."""

from __future__ import annotations

import shlex

from ckpt_doctor import keys
from ckpt_doctor.adapters import AdapterConfig
from ckpt_doctor.facts import ModelFacts
from ckpt_doctor.families import LLAMA_ADAPTER_V1, PEFT_LORA, UNKNOWN, Family
from ckpt_doctor.families.llama_adapter_v2 import MULTIMODAL
from ckpt_doctor.findings import Finding, finding, short_list
from ckpt_doctor.reader import Checkpoint
from ckpt_doctor.upstream_load import OwnLoad, model_names, own_load


def applies(ckpt: Checkpoint, family: Family | None) -> bool:
    """Own-load findings are about files a load_state_dict-style loader takes: an adapter of a
    known family whose model ckpt-doctor can name, or Meta-named weights (a Meta base, a full
    fine-tune), which upstream's Meta model loads. HF- or litgpt-named weights without an
    adapter are loaded by their own library (from_pretrained), not this way."""
    if family is UNKNOWN or (family is not None and family.namespace in ("litgpt", "lit-llama")):
        return False
    if family is None:
        return any(keys.is_base_key(keys.model_name(n)) for n in ckpt.tensors)
    return True


def load_findings(
    ckpt: Checkpoint, *, family: Family | None, facts: ModelFacts, adapter: AdapterConfig | None
) -> list[Finding]:
    """CONTAINER_NESTED / LOAD_NOTHING / LOAD_FAILS / KEY_PREFIX for the file as saved."""
    if not ckpt.tensors:
        return []
    out = check_container(ckpt, family)
    if not applies(ckpt, family):
        return out
    load = own_load(ckpt, family=family, facts=facts, adapter=adapter)
    return [*out, *check_own_load(ckpt, load), *check_prefix(ckpt, load, facts, adapter)]


def check_container(ckpt: Checkpoint, family: Family | None) -> list[Finding]:
    if not ckpt.container_path:
        return []
    where = ckpt.container_subscripts
    others = [f"{k} ({e.summary})" for k, e in ckpt.entries.items()]
    own = family is not None and ckpt.container_path == (family.loader.container,)
    # The family's own file layout ({'model': ...}, v2 multimodal's 'config' beside it) is
    # nothing to report; a training checkpoint's optimizer, epoch and args are.
    if (own and set(ckpt.entries) <= {"config"} and family is MULTIMODAL) or (own and not others):
        return []
    hint = (
        f"{family.name} keeps its weights under checkpoint{where} and its own loader reads them "
        "there; extracting the adapter drops the other entries"
        if own and family is not None
        else f"load checkpoint{where}, not the whole file, or extract the adapter tensors "
        "into a flat file"
    )
    return [
        finding(
            "CONTAINER_NESTED",
            f"weights are nested under checkpoint{where}; other entries: "
            + (", ".join(others) or "none"),
            hint,
            container_path=list(ckpt.container_path),
            entries={k: e.summary for k, e in ckpt.entries.items()},
        )
    ]


def check_own_load(ckpt: Checkpoint, load: OwnLoad) -> list[Finding]:
    """LOAD_FAILS when its loader raises; LOAD_NOTHING when it loads, matching nothing."""
    family = load.family
    if load.error is not None:
        return [
            finding(
                "LOAD_FAILS",
                f"{family.name}'s own loader, {load.code}, raises on this file: {load.error}",
                f"save the tensors the way {family.name} does"
                + (
                    f" (under {{'{family.loader.container}': state_dict}})"
                    if family.loader.container
                    else ""
                )
                + ": ckpt-doctor extract writes that layout",
                error=load.error,
            )
        ]
    if load.matched or not load.seen:
        return []
    return [load_nothing(ckpt, load)]


def load_nothing(ckpt: Checkpoint, load: OwnLoad) -> Finding:
    """LOAD_NOTHING, the one message for it: inspect and diagnose predict it from the names,
    a smoke run with --load-as upstream sees it happen; the same fact, the same error (loading
    the file as its own code does gives the plain base model)."""
    family = load.family
    who = "upstream's" if family is LLAMA_ADAPTER_V1 else f"{family.name}'s own"
    what = (
        "every adapter gate keeps its zero init and the model runs as the plain base"
        if family.trained_keys(ckpt.canonical())
        else "the model keeps the weights it had before (for a base: random ones)"
    )
    if family is PEFT_LORA:  # its B matrices are zero-init
        what = "every LoRA B keeps its zero init and the model runs as the plain base"
    # Say what each number counts: the model's keys vs the file's top-level keys.
    message = (
        f"{who} load_state_dict(strict=False) takes 0 of the model's {load.model_keys} keys "
        f"from this file: none of the file's {len(load.seen)} top-level keys "
        f"({short_list(load.seen)}) is a model key; {what}"
        if load.seen
        else f"{who} load_state_dict(strict=False) takes 0 of the model's {load.model_keys} "
        f"keys from this file: it holds no tensors; {what}"
    )
    # A prefix is cured by stripping it; a container by taking the tensors out.
    foreign = ckpt.prefix.foreign(family.loader.own_prefix) if ckpt.prefix else []
    if foreign and not ckpt.container_path:
        hint = f"strip the prefix: ckpt-doctor repair {shlex.quote(str(ckpt.path))} -o fixed.pth"
    else:
        hint = (
            "load the adapter tensors themselves: extract them into a file with its own names "
            "(ckpt-doctor extract), or load the file with --load-as strict"
        )
    return finding(
        "LOAD_NOTHING",
        message,
        hint,
        keys_seen=len(load.seen),
        matched=0,
        model_keys=load.model_keys,
    )


def check_prefix(
    ckpt: Checkpoint, load: OwnLoad, facts: ModelFacts, adapter: AdapterConfig | None
) -> list[Finding]:
    """KEY_PREFIX: wrapper segments (module., _orig_mod., FSDP's) or another family's namespace
    prefix; a family's own prefix (llama. for v2 multimodal, PEFT's base_model.model.) is not."""
    rewrite = ckpt.prefix
    own_prefix = load.family.loader.own_prefix
    foreign = rewrite.foreign(own_prefix) if rewrite is not None else []
    if rewrite is None or not foreign:
        return []
    names = list(ckpt.tensors)
    expected = model_names(load.family, facts, adapter)
    before = sum(n in expected for n in names) / len(names)
    after = sum(keys.own_name(n, own_prefix) in expected for n in names) / len(names)
    shown = "".join(foreign)
    return [
        finding(
            "KEY_PREFIX",
            f"{rewrite.keys_with(foreign)} of {rewrite.total_keys} keys carry the prefix "
            f"'{shown}'; overlap with the model's names is {before:.0%} as saved and "
            f"{after:.0%} after stripping it",
            f"strip '{shown}' from the keys before loading "
            f"(ckpt-doctor repair {shlex.quote(str(ckpt.path))} -o fixed.pth does)",
            prefix="".join(foreign),
            overlap_before=before,
            overlap_after=after,
        )
    ]
