"""``demo``: the whole story on the bundled fixture world, start to finish.

1. the symptom: the training checkpoint loaded as upstream example.py does loops, no eos;
2. diagnose: the root cause and the command that fixes it;
3. extract the adapter; 4. verify it; 5. the cure: base + adapter ends in eos;
6. the LoRA scene (world/lora, when there): a PEFT LoRA whose adapter_model.bin the alpaca-lora
   save bug left empty. diagnose finds it (EMPTY, and the Trainer checkpoint that holds the
   weights), extract takes the LoRA out of checkpoint-N/pytorch_model.bin, verify proves it, and
   base + LoRA ends in eos.

The world's prompts.json gives the held-out instructions and their answers, so the demo says
how many of the answers it shows are right; manifest.json records the accuracy on all of them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_doctor.diagnosis import Diagnosis, diagnose
from ckpt_doctor.errors import UsageError
from ckpt_doctor.extraction import Extraction, extract
from ckpt_doctor.generate import GenerationConfig
from ckpt_doctor.progress import Progress, prefixed
from ckpt_doctor.reader import open_checkpoint
from ckpt_doctor.smoke import SmokeReport, smoke_generate
from ckpt_doctor.verification import VerifyReport, verify

# Where the fixture world lives in a source checkout (fixtures/ is not installed).
WORLD = Path(__file__).resolve().parents[1] / "fixtures" / "world"
N_PROMPTS = 4
N_LORA_PROMPTS = 2


@dataclass
class LoraScene:
    """The LoRA scene: the empty adapter diagnosed, the LoRA extracted, verified, and run."""

    folder: Path
    diagnosis: Diagnosis
    extraction: Extraction
    verification: VerifyReport
    after: SmokeReport
    seconds: float = 0.0

    @property
    def holds(self) -> bool:
        looped = all(o != "eos" for o in self.diagnosis.arms[0].outcomes)
        cured = all(r.outcome == "eos" for r in self.after.results)
        empty = self.diagnosis.root_cause == "EMPTY"
        return empty and looped and cured and self.verification.passed


@dataclass
class DemoResult:
    world: Path
    before: SmokeReport
    diagnosis: Diagnosis
    extraction: Extraction
    verification: VerifyReport
    after: SmokeReport
    answers: list[str] | None = None  # the expected answer of each prompt shown
    accuracy: dict[str, int] | None = None  # {"prompts", "correct"} on every held-out prompt
    lora: LoraScene | None = None

    @property
    def correct(self) -> int | None:
        """How many of the cured generations are exactly the expected answer."""
        if self.answers is None:
            return None
        return sum(
            r.outcome == "eos" and r.text.strip() == a
            for r, a in zip(self.after.results, self.answers, strict=False)
        )

    @property
    def story_holds(self) -> bool:
        looped = all(r.outcome != "eos" for r in self.before.results)
        cured = all(r.outcome == "eos" for r in self.after.results)
        lora = self.lora is None or self.lora.holds
        return looped and cured and self.verification.passed and lora

    @property
    def exit_code(self) -> int:
        return 0 if self.story_holds else 1


def run_demo(
    workdir: Path,
    *,
    world: Path = WORLD,
    max_new_tokens: int = 64,
    progress: Progress | None = None,
) -> DemoResult:
    world = _shown(world)
    ckpt_path, base_path = world / "checkpoint-4.pth", world / "base"
    if not ckpt_path.exists() or not base_path.exists():
        raise UsageError(
            f"no fixture world at {world}",
            hint="run the demo from a source checkout, or pass --world DIR "
            "(built by python fixtures/make_fixtures.py --world)",
        )
    prompts, answers = _held_out(world / "prompts.json")
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    adapter_path = workdir / "adapter.safetensors"

    def step(k: int, name: str) -> Progress | None:
        return prefixed(progress, f"{k}/5 {name}: ")

    with open_checkpoint(base_path) as base:
        with open_checkpoint(ckpt_path) as ckpt:
            before = smoke_generate(
                base, full=ckpt, load_as="upstream", prompts=prompts, config=config,
                progress=step(1, "the symptom"),
            )  # fmt: skip
        diagnosis = diagnose(
            ckpt_path, base_path, prompts=prompts, config=config, progress=step(2, "diagnose")
        )
        with open_checkpoint(ckpt_path) as ckpt:
            extraction = extract(ckpt, adapter_path, base=base, force=True)
        with open_checkpoint(adapter_path) as adapter, open_checkpoint(ckpt_path) as ckpt:
            verification = verify(adapter, base=base, full=ckpt, progress=step(4, "verify"))
            after = smoke_generate(
                base, adapter=adapter, prompts=prompts, config=config, progress=step(5, "the cure")
            )
        lora = None
        if (world / "lora" / "adapter_config.json").is_file():
            lora = lora_scene(
                world / "lora", base_path, workdir, prompts[:N_LORA_PROMPTS], config,
                progress=step(6, "LoRA"),
            )  # fmt: skip
    return DemoResult(
        world, before, diagnosis, extraction, verification, after, answers,
        _accuracy(world / "manifest.json"), lora,
    )  # fmt: skip


def lora_scene(
    folder: Path,
    base_path: Path,
    workdir: Path,
    prompts: list[str],
    config: GenerationConfig,
    *,
    progress: Progress | None = None,
) -> LoraScene:
    """Diagnose the empty adapter, extract the LoRA from the checkpoint diagnose names,
    verify it against that checkpoint, run base + LoRA."""
    clock = time.perf_counter()
    diagnosis = diagnose(folder, base_path, prompts=prompts, config=config, progress=progress)
    found = next((f for f in diagnosis.findings if f.id == "EMPTY"), None)
    weights = (found.evidence.get("weights_at") or [None])[0] if found else None
    if weights is None:
        raise UsageError(
            f"{folder}: diagnose found no checkpoint-N/ holding the LoRA's weights",
            hint="rebuild the scene: python fixtures/make_fixtures.py --lora-world",
        )
    checkpoint, out = _shown(Path(weights)), workdir / "lora-adapter"
    with open_checkpoint(base_path) as base:
        with open_checkpoint(checkpoint) as ckpt:
            extraction = extract(ckpt, out, base=base, force=True)
        with open_checkpoint(out) as adapter, open_checkpoint(checkpoint) as ckpt:
            verification = verify(adapter, base=base, full=ckpt)
            after = smoke_generate(base, adapter=adapter, prompts=prompts, config=config)
    return LoraScene(
        folder, diagnosis, extraction, verification, after, time.perf_counter() - clock
    )


def _shown(path: Path) -> Path:
    """The world as a person would type it: relative to the working directory when it lies
    below it (or below a fixtures/ link there), else as given."""
    cwd = Path.cwd()
    try:
        return path.resolve().relative_to(cwd.resolve())
    except ValueError:
        pass
    linked = Path("fixtures") / path.name
    if (cwd / linked).is_dir() and (cwd / linked).resolve() == path.resolve():
        return linked
    return path


def _held_out(path: Path) -> tuple[list[str], list[str] | None]:
    """The demo's prompts (the world's held-out set; fixtures/tiny has none, say so) and their
    answers when the world records them."""
    hint = (
        "pass --world a fixture world with prompts.json "
        "(built by python fixtures/make_fixtures.py --world), e.g. fixtures/world"
    )
    if not path.is_file():
        raise UsageError(f"no prompts.json in {path.parent}", hint=hint)
    try:
        doc = json.loads(path.read_text())
        prompts = doc["held_out"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: no held_out prompt list ({exc})", hint=hint) from None
    if not isinstance(prompts, list) or not prompts:
        raise UsageError(f"{path}: held_out is not a non-empty list of prompts", hint=hint)
    answers = doc.get("answers")
    if not isinstance(answers, list) or len(answers) != len(prompts):
        answers = None
    shown = [str(p) for p in prompts[:N_PROMPTS]]
    return shown, None if answers is None else [str(a) for a in answers[:N_PROMPTS]]


def _accuracy(path: Path) -> dict[str, int] | None:
    """The world's exact-answer accuracy on all its held-out prompts, as its build measured."""
    try:
        accuracy = json.loads(path.read_text())["accuracy"]
        return {"prompts": int(accuracy["prompts"]), "correct": int(accuracy["correct"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
