"""Retraining (recipe steps 1 and 4): teacher correction and knowledge distillation, on transformers' Trainer.

Consumes checkpoints and a prepared dataset; produces a stock Hugging Face checkpoint plus `train_log.json`
(the loss curve) and a manifest. The Trainer gives us the mechanics users run for days: linear warm-up then cosine
decay to a minimum LR, gradient accumulation to the global batch, bf16 on GPU / fp32 on CPU, gradient
checkpointing, one GPU or many through `torchrun` / `accelerate launch` (DDP, FSDP), and checkpoints holding
weights, optimizer, scheduler, data position and RNG every `save_steps`. A run killed at any point and started
again with the same command resumes from its last checkpoint (kept in `<out>.checkpoints/`, or under
$SECATEURS_CHECKPOINTS by the run's identity) and ends where the uninterrupted run would have.

Distillation loss (recipe.md step 4): forward KL(teacher || student) on logits, temperature T with the T^2 factor,
optional top-K teacher logits, optional cross-entropy mix, optional intermediate-state cosine losses on layer pairs
(learned projections when widths differ, rescaled every step by L_logits / L_int). The teacher is a frozen
attribute of the trainer: it never reaches the optimizer, gradient clipping or checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from secateurs import losses
from secateurs.config import DistillConfig, TeacherCorrectionConfig, TrainingConfig
from secateurs.checkpoint import load_model, load_tokenizer
from secateurs.data import check_matches, load_packed, tokenizer_identity
from secateurs.families import compile_decoder_layers, parameter_count
from secateurs.manifest import atomic_output, read_manifest, write_manifest

RUN_ID_FILE = "secateurs-run.json"
# A root for checkpoints on storage that outlives the process's output path (see _checkpoints_dir).
CHECKPOINTS_ENV = "SECATEURS_CHECKPOINTS"

# torch.compile backend of `compile_layers` (inductor generates the fused kernels; tests use aot_eager, which
# traces the same graphs forward and backward without generating code).
COMPILE_BACKEND = "inductor"


class TrainingError(ValueError):
    """Inputs that cannot be trained together, or a run that diverged."""


@dataclass
class _Context:
    teacher: object = None
    teacher_lm_head: torch.Tensor | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    projections: torch.nn.ModuleList | None = None


def correct_teacher(model_dir, data_dir, out, settings: TeacherCorrectionConfig, callbacks=()) -> dict:
    """Teacher correction: a short LM fine-tune of the teacher on the distillation data."""
    model = load_model(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, tokenizer, where=f"dataset {data_dir}")
    identity = _run_identity("correct-teacher", [model_dir, data_dir], settings)
    report = _train(model, None, dd, out, settings, identity, callbacks)
    with atomic_output(out) as tmp:
        _save(model, tokenizer, tmp, report)
        write_manifest(tmp, "correct-teacher", inputs={"model": model_dir, "data": data_dir},
                       config=settings.model_dump(), report=report)
    return report


def distill(teacher_dir, student_dir, data_dir, out, settings: DistillConfig, callbacks=()) -> dict:
    """Retrain STUDENT by knowledge distillation from TEACHER on DATA; write the student to OUT."""
    teacher_tok, student_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if tokenizer_identity(teacher_tok) != tokenizer_identity(student_tok):
        raise TrainingError(f"teacher {teacher_dir} and student {student_dir} use different tokenizers")
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, student_tok, where=f"dataset {data_dir}")
    teacher = load_model(teacher_dir, dtype=torch.float32)
    student = load_model(student_dir, dtype=torch.float32)
    if parameter_count(student) >= parameter_count(teacher):
        raise TrainingError(
            f"student {student_dir} ({parameter_count(student):,} parameters) is not smaller than "
            f"teacher {teacher_dir} ({parameter_count(teacher):,})"
        )
    ctx = _Context(teacher=teacher.requires_grad_(False).eval())
    if settings.intermediate_loss:
        ctx.pairs = settings.layer_pairs or losses.default_layer_mapping(
            student.config.num_hidden_layers, teacher.config.num_hidden_layers, _kept_layers(student_dir)
        )
        ctx.projections = losses.intermediate_projections(
            student.config.hidden_size, teacher.config.hidden_size, len(ctx.pairs)
        )
    identity = _run_identity("distill", [teacher_dir, student_dir, data_dir], settings)
    report = _train(student, ctx, dd, out, settings, identity, callbacks)
    report["layer_pairs"] = ctx.pairs
    with atomic_output(out) as tmp:
        _save(student, student_tok, tmp, report)
        write_manifest(
            tmp, "distill", inputs={"teacher": teacher_dir, "model": student_dir, "data": data_dir},
            config=settings.model_dump(), report=report,
        )  # fmt: skip
    return report


def _train(model, ctx: _Context | None, dd, out, settings: TrainingConfig, identity: dict, callbacks) -> dict:
    """Run the Trainer (resuming from `<out>.checkpoints` when it holds this run's checkpoints)."""
    from transformers import TrainingArguments, default_data_collator

    # Newer transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns);
    # older 5.x releases (the GPU image's 5.17) know only the old one.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = settings.micro_batch_size * world
    if settings.global_batch_size % per_step:
        raise TrainingError(
            f"global_batch_size={settings.global_batch_size} is not a multiple of micro_batch_size x GPUs = {per_step}"
        )
    digest = _digest(identity)
    work = _checkpoints_dir(out, identity["step"], digest)
    last = _claim_checkpoint_dir(work, identity, digest)
    if settings.compile_layers:
        compile_decoder_layers(model, *([] if ctx is None else [ctx.teacher]), backend=COMPILE_BACKEND)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.global_batch_size // per_step,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": settings.min_learning_rate},
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=cuda,
        dataloader_pin_memory=cuda,  # pinning is a no-op without an accelerator (and warns)
        **{checkpointing: settings.gradient_checkpointing},
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit or None,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the divergence check, not be hidden
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=False,
        remove_unused_columns=False,
    )
    train = dd["train"].with_format("torch")
    trainer_cls = DistillationTrainer if ctx is not None else LMTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                          callbacks=[DivergenceCallback(), *callbacks])
    trainer.ctx, trainer.settings = ctx, settings
    if ctx is not None and ctx.projections is not None and last:
        trainer.load_projections(last)
    result = trainer.train(resume_from_checkpoint=last)
    history = [h for h in trainer.state.log_history if "loss" in h]
    (work / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return {
        "steps": trainer.state.global_step,
        "final_loss": history[-1]["loss"] if history else result.training_loss,
        "mean_loss": result.training_loss,
        "tokens_seen": trainer.state.global_step * settings.global_batch_size * train[0]["input_ids"].numel(),
        "resumed_from": Path(last).name if last else None,
        "checkpoint_dir": str(work),
        "log_history": history,
    }


class LMTrainer(Trainer):
    """Causal-LM fine-tuning on packed sequences: labels are the inputs (the model shifts them)."""

    ctx: _Context | None = None
    settings: DistillConfig | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        out = model(input_ids=ids, labels=ids, use_cache=False)
        return (out.loss, out) if return_outputs else out.loss

class DistillationTrainer(LMTrainer):
    """The student is the Trainer's model; the teacher and the projections live in `self.ctx`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ctx, s = self.ctx, self.settings
        ids = inputs["input_ids"]
        want_states = bool(ctx.pairs)
        if s.ce_alpha == 1 and not want_states:
            # Cross-entropy only (the KD baseline): the teacher's outputs would be weighted by zero, so skip them.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():
            t_out = ctx.teacher.model(input_ids=ids, output_hidden_states=want_states, use_cache=False)
        # The student's final hidden state is caught at its final norm so the call still goes through the
        # (possibly DDP-wrapped) model; logits_to_keep=1 skips the full-vocabulary logits, which the
        # fused loss computes chunk by chunk instead.
        unwrapped = self.accelerator.unwrap_model(model)
        caught = {}
        handle = unwrapped.model.norm.register_forward_hook(lambda m, a, o: caught.setdefault("h", o))
        try:
            s_out = model(input_ids=ids, output_hidden_states=want_states, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        labels = torch.full_like(ids, losses.IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
        loss = losses.fused_kd_loss(
            caught["h"], unwrapped.lm_head.weight, t_out.last_hidden_state, ctx.teacher.lm_head.weight,
            temperature=s.temperature, top_k=s.top_k, chunk_size=s.kd_chunk_size,
            labels=labels, ce_alpha=s.ce_alpha, backend=s.kd_backend,
        )  # fmt: skip
        if want_states:
            l_int = losses.intermediate_cosine_loss(
                s_out.hidden_states, t_out.hidden_states, ctx.pairs, ctx.projections
            )
            loss = loss + losses.rescale_intermediate(loss, l_int)
        return (loss, s_out) if return_outputs else loss

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.ctx.projections is not None:
            # The learned maps P train with the student (recipe step 4).
            optimizer.add_param_group({"params": list(self.ctx.projections.parameters()), "weight_decay": 0.0})
        return optimizer

    def _save_checkpoint(self, model, trial):
        if self.ctx.projections is not None:
            # Written first: trainer_state.json (the Trainer's last write) then marks a whole checkpoint.
            path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}" / "projections.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.ctx.projections.state_dict(), path)
        super()._save_checkpoint(model, trial)

    def load_projections(self, checkpoint):
        self.ctx.projections.load_state_dict(torch.load(Path(checkpoint) / "projections.pt"))

class DivergenceCallback(TrainerCallback):
    """Stop at the first non-finite logged loss; the last checkpoint (written before it) stays intact."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(
                f"training diverged: loss is {loss} at step {state.global_step}; "
                f"the last good checkpoint is kept in {args.output_dir}"
            )


# Settings that change what is written along the way, not the run: a resume may change them.
_NOT_IDENTITY = ("save_steps", "save_total_limit", "logging_steps")


def _run_identity(step: str, inputs: list, settings: TrainingConfig) -> dict:
    from secateurs.manifest import content_hash

    return {
        "step": step,
        "inputs": [content_hash(p) for p in inputs],
        "settings": {k: v for k, v in settings.model_dump().items() if k not in _NOT_IDENTITY},
    }


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checkpoints_dir(out, step: str, digest: str) -> Path:
    """Where a run's checkpoints go: `<out>.checkpoints`, or `$SECATEURS_CHECKPOINTS/<step>-<run digest>`.

    On a cluster a step's output path is local to its pod, and a retried pod starts with a new, empty one: its
    checkpoints would be gone. With SECATEURS_CHECKPOINTS on a volume that outlives pods (the pipeline points it
    at the cache PVC), the retry finds them by the run's identity (its inputs' content hashes and its settings),
    wherever its output now goes.
    """
    root = os.environ.get(CHECKPOINTS_ENV)
    if root:
        return Path(root).absolute() / f"{step}-{digest}"
    return Path(f"{Path(out).absolute()}.checkpoints")


def _claim_checkpoint_dir(work: Path, identity: dict, digest: str) -> str | None:
    """The last checkpoint of this same run, or None for a fresh start; refuses another run's directory."""
    marker = work / RUN_ID_FILE
    if work.exists() and any(work.iterdir()):
        recorded = json.loads(marker.read_text()).get("digest") if marker.is_file() else None
        if recorded != digest:
            raise TrainingError(
                f"checkpoint dir {work} belongs to another run (different inputs or settings); "
                "move it away or choose another --out"
            )
        return _last_complete_checkpoint(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"digest": digest, **identity}, indent=1, default=str))
    return None


def _last_complete_checkpoint(work: Path) -> str | None:
    """The newest checkpoint whose trainer_state.json (the Trainer's last write) is whole.

    A run killed while writing a checkpoint leaves a partial one behind; transformers' `get_last_checkpoint`
    would pick it and the resume would fail, so partial ones are removed (their steps are recomputed) instead.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    by_step = {
        int(n): p for p in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (n := p.name.rsplit("-", 1)[1]).isdigit()
    }
    for path in (by_step[step] for step in sorted(by_step, reverse=True)):
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
            return str(path)
        except (OSError, ValueError):
            warnings.warn(f"removing {path}: incomplete (the run was stopped while writing it)", stacklevel=2)
            shutil.rmtree(path)
    return None


def _kept_layers(student_dir) -> list[int] | None:
    """Teacher layers a depth-pruned student kept (from its prune manifest), for the default layer mapping."""
    report = read_manifest(student_dir).get("report", {})
    return report.get("kept_layers") if report.get("dropped_layers") else None


def _save(model, tokenizer, out: Path, report: dict) -> None:
    from secateurs.checkpoint import save_checkpoint

    model.config.use_cache = True
    save_checkpoint(model.to(torch.float32), tokenizer, out)
    (out / "train_log.json").write_text(json.dumps(report.get("log_history", []), indent=1))
