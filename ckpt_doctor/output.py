"""What goes out as plain text: the one JSON document, the stdout stream rich prints tables to,
and the one-line summaries (--quiet, the demo's last line). No rich here: render.py draws."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from typing import TYPE_CHECKING, Any

from ckpt_doctor.errors import CkptDoctorError
from ckpt_doctor.findings import error_finding

if TYPE_CHECKING:
    from ckpt_doctor.demo import DemoResult


def json_safe(value: Any) -> Any:
    """The one JSON encoding rule: JSON has no NaN or Inf, so a non-finite float is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def print_json(doc: dict[str, Any]) -> None:
    """Exactly one JSON document on stdout, nothing else there."""
    sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def error_json(exc: CkptDoctorError) -> dict[str, Any]:
    """The --json document of an error: the error, and the same as a finding of the shape
    every other finding has."""
    return {
        "error": {"id": exc.code, "message": exc.message, "hint": exc.hint},
        "findings": [error_finding(exc).to_json()],
    }


class Unpadded(io.TextIOBase):
    """sys.stdout as it is at each write, minus the spaces rich pads every line of a table or a
    grid with up to the console width: a pipe or a file gets no trailing blanks. (rich writes a
    whole print at once, so every padded line end is in one write.)"""

    def write(self, text: str) -> int:
        sys.stdout.write(re.sub(r" +$", "", text, flags=re.MULTILINE))
        return len(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()


def demo_summary(result: DemoResult) -> str:
    """The demo's last line: did the story hold, and how right are the cured answers."""
    if not result.story_holds:
        return "the demo story did not hold on this machine (see above)"
    line = "eos is back: the adapter was never loaded, now it is."
    right = []
    if result.correct is not None:
        right.append(f"{result.correct} of these {len(result.after.results)}")
    if result.accuracy is not None:
        a = result.accuracy
        right.append(
            f"{a['correct']} of the world's {a['prompts']} held-out prompts (manifest.json)"
        )
    line += f" Right answers: {'; '.join(right)}." if right else ""
    if result.lora is not None:
        ended = sum(r.outcome == "eos" for r in result.lora.after.results)
        line += (
            f" LoRA: the empty adapter_model.bin ran as the base; extracted from the Trainer "
            f"checkpoint, eos on {ended} of {len(result.lora.after.results)}."
        )
    return line


def outcome_counts(results: list[Any]) -> str:
    """ "3 eos, 1 loop": how the prompts of a smoke run ended, in generate.OUTCOMES order."""
    from ckpt_doctor.generate import OUTCOMES

    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)


def quiet_line(report: Any) -> str:
    """The one line --quiet keeps besides the findings: how the command ended."""
    from ckpt_doctor.diffing import DiffReport
    from ckpt_doctor.extraction import Extraction
    from ckpt_doctor.inspection import InspectReport
    from ckpt_doctor.repair import RepairReport
    from ckpt_doctor.verification import VerifyReport

    if isinstance(report, InspectReport):
        return "" if report.findings else "no findings"
    if isinstance(report, DiffReport):
        return ", ".join(f"{v} {k}" for k, v in report.counts.items() if v)
    if isinstance(report, VerifyReport):
        return report.verdict
    if isinstance(report, Extraction):
        return f"extracted {len(report.taken)} tensors -> {report.output}"
    if isinstance(report, RepairReport):
        return "nothing written" if report.output is None else f"repaired -> {report.output}"
    # The generation reports: their modules import torch, loaded already when they exist.
    from ckpt_doctor.diagnosis import Diagnosis
    from ckpt_doctor.smoke import SmokeReport

    if isinstance(report, Diagnosis):
        fix = f"; fix: {report.fix}" if report.fix else ""
        return f"root cause: {report.root_cause or 'none'}{fix}"
    if isinstance(report, SmokeReport):
        return outcome_counts(report.results)
    from ckpt_doctor.demo import DemoResult

    if isinstance(report, DemoResult):
        return demo_summary(report)
    return ""


def lora_summary(adapter: Any) -> str:
    """A PEFT LoRA in a few words: its linears, ranks and alpha, and where the config came from."""
    lora = adapter.lora
    settings = lora.settings
    ranks = sorted({m.rank for m in lora.modules.values() if m.rank})
    alpha = settings.lora_alpha if settings is not None else "unknown"
    rslora = ", rsLoRA" if settings is not None and settings.use_rslora else ""
    where = lora.config_path or "no adapter_config.json found"
    return (
        f"LoRA on {len(lora.modules)} linears, r {'/'.join(map(str, ranks)) or '-'}, "
        f"lora_alpha {alpha}{rslora} (config: {where})"
    )


def keys_loaded(load: Any) -> str:
    """What a load took from the file: model keys, or LoRA tensors merged into the linears."""
    n = len(load.from_file)
    if load.adapter is not None and load.adapter.lora is not None:
        return f"{n} LoRA tensors from the file merged into {n // 2} linears"
    return f"{n} of {load.model_keys} model keys from the file"


def adapter_words(adapter: Any) -> str:
    """extract's adapter line: the prompt's shape, or the LoRA's."""
    if adapter.lora is not None:
        return lora_summary(adapter)
    a = adapter
    return f"adapter_len {a.adapter_len}, adapter_layer {a.adapter_layer} (from {a.source})"


def lora_steps(result: DemoResult) -> list[tuple[str, str, Any]]:
    """The demo's LoRA scene as (step title or "", which report, the report)."""
    lora = result.lora
    if lora is None:
        return []
    return [
        (f"6. LoRA: {result.world.name}/lora/adapter_model.bin, saved by alpaca-lora's code",
         "diagnose", lora.diagnosis),
        ("7. LoRA: ckpt-doctor extract from the checkpoint diagnose found, and verify",
         "extract", lora.extraction),
        ("", "verify", lora.verification),
        ("8. LoRA cured: base + extracted LoRA", "smoke", lora.after),
    ]  # fmt: skip
