"""The recipe's order in one process: correct the teacher, score it, prune the student from it.

The pipeline (`secateurs.pipelines.recipe`) runs these steps as KFP tasks; this module runs the same library
steps in order for code that works in one process on one machine: benchmarks and the real-model tests. Each step
is skipped when its output already exists: every step writes its artifact atomically, so an existing one is
whole, and a rerun with a kept work directory redoes nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from secateurs.config import ImportanceConfig, TeacherCorrectionConfig


@dataclass
class PrunedStudent:
    """The artifacts `prune_student` produced (or found)."""

    teacher: Path  # the teacher to distil from: the corrected one when correction ran
    scores: Path  # importance of the model the student was pruned from
    student: Path  # the pruned student
    report: dict | None  # prune's report (None when the student already existed)


def prune_student(
    teacher: str | Path,
    data: str | Path,
    work: str | Path,
    target,
    importance: ImportanceConfig,
    correction: TeacherCorrectionConfig | None = None,
    prune_from: str = "corrected",
    name: str = "student",
) -> PrunedStudent:
    """Steps 1-3 of the recipe: teacher correction (when `correction` is given), importance, pruning.

    Args:
        teacher: the teacher checkpoint.
        data: a dataset prepared with its tokenizer.
        work: directory for the artifacts: `teacher-corrected`, `importance[-corrected]`, `<name>[-corrected]`.
        target: a `secateurs.prune.PruneTarget`.
        importance: the importance settings.
        correction: teacher-correction settings; None distils from the original teacher.
        prune_from: "corrected" scores and prunes the corrected teacher (the recipe's order), "original" the
            original one (correction then only changes the teacher the student is distilled from).
        name: the student's directory name.
    """
    from secateurs import importance as importance_step
    from secateurs import prune, train

    work, teacher = Path(work), Path(teacher)
    source, tag = teacher, ""
    if correction is not None:
        corrected = work / "teacher-corrected"
        if not corrected.exists():
            train.correct_teacher(teacher, data, corrected, correction)
            # Its optimizer state: nothing downstream reads it (1.5 GB for SmolLM2-135M).
            shutil.rmtree(f"{corrected}.checkpoints", ignore_errors=True)
        teacher = corrected
        if prune_from == "corrected":
            source, tag = corrected, "-corrected"
    scores = work / f"importance{tag}"
    if not scores.exists():
        importance_step.run(source, data, scores, importance)
    student, report = work / f"{name}{tag}", None
    if not student.exists():
        report = prune.run(source, scores, student, target)
    return PrunedStudent(teacher, scores, student, report)


def random_init(like: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised model of the shape of `like`, with its tokenizer: the baseline that shows what the
    pruned weights are worth. Skipped when `out` exists."""
    from transformers import AutoModelForCausalLM

    from secateurs.checkpoint import load_model, load_tokenizer, save_checkpoint
    from secateurs.files import atomic_output
    from secateurs.manifest import write_manifest

    out = Path(out)
    if out.exists():
        return out
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_model(like).config)
    with atomic_output(out) as tmp:
        save_checkpoint(model, load_tokenizer(like), tmp)
        write_manifest(tmp, "import-model", config={"source": f"random init of the shape of {Path(like).name}", "seed": seed})
    return out
