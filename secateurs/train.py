"""Retraining (recipe steps 1 and 4): teacher correction and knowledge distillation, on transformers' Trainer.

Consumes checkpoints and a prepared dataset; produces a stock Hugging Face checkpoint plus `train_log.json`
(the loss curve) and a manifest. The Trainer gives us the mechanics users run for days: linear warm-up then cosine
decay to a minimum LR, gradient accumulation to the global batch, bf16 on GPU / fp32 on CPU, gradient
checkpointing, one process or one per GPU under `torchrun` (`parallelism`: DDP, or FSDP2 sharding the student's
parameters, gradients and optimizer state), and checkpoints holding weights, optimizer, scheduler, data position
and RNG every `save_steps` (sharded under FSDP). A run killed at any point and started
again with the same command resumes from its last checkpoint (kept in `<out>.checkpoints/`, or under
$SECATEURS_CHECKPOINTS by the run's identity) and ends where the uninterrupted run would have.

Distillation loss (recipe.md step 4): forward KL(teacher || student) on logits, temperature T with the T^2 factor,
optional top-K teacher logits, optional cross-entropy mix, optional intermediate-state cosine losses on layer pairs
(learned projections when widths differ, rescaled every step by L_logits / L_int). The teacher is a frozen
attribute of the trainer: it never reaches the optimizer, gradient clipping or checkpoints.

Under torchrun every process runs this same code; the Trainer splits each global batch over them. The frozen
teacher is replicated on every process, in bf16 on GPUs, never sharded: it runs a forward pass every micro-batch,
and sharding it would add an all-gather of all its weights to each of them (16 GB per micro-batch and GPU for an
8B teacher) to save memory that the plan (`secateurs plan`) shows is there (16 GB of an 80 GB GPU). The chunked
KD loss reads the student's LM head weight outside the forward pass; under FSDP2 that weight is whole only because
accelerate >= 1.14 (huggingface/accelerate#4015, `fsdp2_prepare_model` in accelerate/utils/fsdp_utils.py) shards
the final norm and the LM head as one group with `reshard_after_forward=False`, which keeps them gathered from the
end of forward into backward. Older accelerate left them in the root module with our `reshard_after_forward=True`,
and torch >= 2.8 (pytorch/pytorch#154704) honours that for the root too: the head would be a shard by then. Hence
the accelerate pin, checked again in `_check_processes`.
"""

from __future__ import annotations

import dataclasses
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
from secateurs.checkpoint import default_device, frozen_dtype, load_frozen, load_model, load_tokenizer
from secateurs.config import DistillConfig, TeacherCorrectionConfig, TrainingConfig
from secateurs.data import check_matches, load_packed, tokenizer_identity
from secateurs.families import compile_decoder_layers, parameter_count
from secateurs.files import CHECKPOINTS_ENV, atomic_output
from secateurs.manifest import json_digest, read_manifest, write_manifest

RUN_ID_FILE = "secateurs-run.json"
# The student's submodule holding the intermediate-loss projections while it trains (never saved with it).
PROJECTIONS = "secateurs_kd_projections"

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
    world = _check_processes(settings)
    model = load_model(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, tokenizer, where=f"dataset {data_dir}")
    identity = _run_identity("correct-teacher", [model_dir, data_dir], settings)
    report, weights = _train(model, None, dd, out, settings, identity, callbacks, world)

    def write():
        with atomic_output(out) as tmp:
            _save(model, tokenizer, tmp, report, weights, settings.save_dtype)
            write_manifest(tmp, "correct-teacher", inputs={"model": model_dir, "data": data_dir},
                           config=settings.model_dump(), report=report)

    _on_main_process(write)
    return report


def distill(teacher_dir, student_dir, data_dir, out, settings: DistillConfig, callbacks=()) -> dict:
    """Retrain STUDENT by knowledge distillation from TEACHER on DATA; write the student to OUT."""
    world = _check_processes(settings)
    teacher_tok, student_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if tokenizer_identity(teacher_tok) != tokenizer_identity(student_tok):
        raise TrainingError(f"teacher {teacher_dir} and student {student_dir} use different tokenizers")
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, student_tok, where=f"dataset {data_dir}")
    # Frozen, so loaded straight in the dtype it runs in: bf16 on GPUs (an 8B teacher never exists in fp32).
    teacher = load_model(teacher_dir, dtype=frozen_dtype(default_device()))
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
        # Initialised from the run's seed: every process of a torchrun run, and a rerun, starts from the same maps.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            ctx.projections = losses.intermediate_projections(
                student.config.hidden_size, teacher.config.hidden_size, len(ctx.pairs)
            )
        if ctx.projections is not None and settings.parallelism == "fsdp":
            # The maps P train with the student (recipe step 4). FSDP2 accepts in the optimizer only parameters of
            # the model it shards, so under fsdp they are a submodule of the student while it trains: sharded and
            # checkpointed with it, and taken off before it is saved. DDP refuses that (a module parameter used
            # outside `forward`), so otherwise they stay apart: `DistillationTrainer` adds them to the optimizer,
            # averages their gradients and checkpoints them.
            student.add_module(PROJECTIONS, ctx.projections)
    identity = _run_identity("distill", [teacher_dir, student_dir, data_dir], settings)
    report, weights = _train(student, ctx, dd, out, settings, identity, callbacks, world)
    report["layer_pairs"] = ctx.pairs

    def write():
        with atomic_output(out) as tmp:
            _save(student, student_tok, tmp, report, weights, settings.save_dtype)
            if settings.validation_sequences:
                report["validation_loss"] = _validation_loss(tmp, dd, settings.validation_sequences,
                                                             settings.micro_batch_size)  # fmt: skip
            write_manifest(
                tmp, "distill", inputs={"teacher": teacher_dir, "model": student_dir, "data": data_dir},
                config=settings.model_dump(), report=report,
            )  # fmt: skip

    _on_main_process(write)
    return report


def _train(model, ctx: _Context | None, dd, out, settings: TrainingConfig, identity: dict, callbacks,
           world: int) -> tuple[dict, dict | None]:  # fmt: skip
    """Run the Trainer over `world` processes (resuming from this run's checkpoints when there are some).

    Returns:
        The report, and under FSDP the whole weights gathered in the main process (None otherwise).
    """
    from transformers import default_data_collator

    digest = json_digest(identity)
    work = _checkpoints_dir(out, identity["step"], digest)
    if settings.compile_layers:
        compile_decoder_layers(model, *([] if ctx is None else [ctx.teacher]), backend=COMPILE_BACKEND)
    args = _training_arguments(model, settings, work, world, cuda=torch.cuda.is_available())
    # The main process claims the directory (and removes a checkpoint cut short by a kill) before the others look.
    with args.main_process_first(desc="checkpoint directory"):
        last = _claim_checkpoint_dir(work, identity, digest)
    if ctx is not None:
        # Every process holds the whole frozen teacher on its own device (the module docstring says why).
        ctx.teacher.to(args.device)
    if ctx is not None and ctx.projections is not None:
        ctx.projections.to(args.device)
    train = dd["train"]
    train.verify(args.process_index, world)
    trainer_cls = DistillationTrainer if ctx is not None else LMTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                          callbacks=[DivergenceCallback(), *callbacks])
    trainer.ctx, trainer.settings = ctx, settings
    if last and ctx is not None and trainer.separate_projections:
        trainer.load_projections(last)
    result = trainer.train(resume_from_checkpoint=last)
    history = [h for h in trainer.state.log_history if "loss" in h]
    if args.should_save:
        (work / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    weights = None
    if trainer.is_fsdp_enabled:
        # Under FSDP the whole weights exist only once gathered: every process takes part, the main one keeps them
        # (in CPU memory). Not `accelerator.get_state_dict`: it follows the plugin's SHARDED_STATE_DICT setting
        # (the Trainer's checkpoints are shards) and would hand back shards. Nor `save_checkpoint(state_dict=...)`
        # on the trained model: it is FSDP's subclass of the model class, and its class name would be written as
        # the checkpoint's architecture, so `_unsharded` puts the weights into a plain model first.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(trainer.model, options=options)
    return {
        "steps": trainer.state.global_step,
        "final_loss": history[-1]["loss"] if history else result.training_loss,
        "mean_loss": result.training_loss,
        "tokens_seen": trainer.state.global_step * settings.global_batch_size * train.seq_len,
        "resumed_from": Path(last).name if last else None,
        "checkpoint_dir": str(work),
        "processes": world,
        "parallelism": settings.parallelism,
        "log_history": history,
    }, weights


def _training_arguments(model, settings: TrainingConfig, work: Path, world: int, cuda: bool):
    """The Trainer's arguments for a run of `world` processes writing its checkpoints to `work`: bf16 compute on
    GPUs (`cuda`), fp32 on CPU processes."""
    from transformers import TrainingArguments

    # Newer transformers 5.x renamed gradient_checkpointing to activation_checkpointing (the old name warns);
    # older 5.x releases (the GPU image's 5.17) know only the old one.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.global_batch_size // (settings.micro_batch_size * world),
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": settings.min_learning_rate},
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=cuda,
        # Without it, processes on a machine without a GPU do not form a process group and each trains alone.
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,  # pinning is a no-op without an accelerator (and warns)
        **{checkpointing: settings.gradient_checkpointing},
        # Non-reentrant recomputation, stated rather than left to transformers' default (the same today: 5.17 and
        # later pick it when no kwargs are given, modeling_utils.py): the reentrant variant replays a layer in a
        # nested backward that FSDP2's hooks do not follow (duplicate all-gathers: NVIDIA-NeMo/Automodel#3411).
        **{f"{checkpointing}_kwargs": {"use_reentrant": False}},
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
        **_sharding_arguments(model, settings),
    )
    if args.fsdp_plugin_args is not None:
        # TrainingArguments' fsdp_config has no key for it: set on the plugin's arguments it is built from.
        args.fsdp_plugin_args["mixed_precision_policy"] = _fsdp_mixed_precision(bf16=args.bf16)
    return args


def _check_processes(settings: TrainingConfig) -> int:
    """The number of processes of this run (torchrun's WORLD_SIZE), after checking the settings fit it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if settings.global_batch_size % (settings.micro_batch_size * world):
        raise TrainingError(
            f"global_batch_size={settings.global_batch_size} is not a multiple of micro_batch_size x processes = "
            f"{settings.micro_batch_size} x {world}"
        )
    if settings.parallelism == "fsdp" and world == 1:
        raise TrainingError(
            "parallelism=fsdp shards over processes, and this run has one: start it under "
            "`torchrun --nproc-per-node N` with N > 1, or use parallelism=ddp"
        )
    if settings.parallelism == "fsdp":
        _check_accelerate()
    return world


# The first accelerate whose FSDP2 wrapping keeps the LM head whole after forward (the module docstring says why).
FSDP_ACCELERATE = "1.14"


def _check_accelerate() -> None:
    """Refuse, before any model is loaded, an accelerate under which the KD loss would read a shard of the head
    (pyproject pins it; an image that brings its own accelerate would otherwise fail at the first step)."""
    import accelerate
    from packaging.version import Version

    if Version(accelerate.__version__) < Version(FSDP_ACCELERATE):
        raise TrainingError(
            f"parallelism=fsdp needs accelerate >= {FSDP_ACCELERATE} (found {accelerate.__version__}): older releases "
            "shard the LM head after forward, where the distillation loss reads it; upgrade accelerate"
        )


def _sharding_arguments(model, settings: TrainingConfig) -> dict:
    """TrainingArguments for `parallelism=fsdp`: FSDP2 wrapping each decoder layer, sharded checkpoints, gradients
    reduced every micro-batch.

    Mixed precision is the Trainer's (bf16 compute on GPUs) with fp32 gradient reduction (`_fsdp_mixed_precision`,
    set by `_training_arguments`); the weights the optimizer updates stay fp32 (the model is loaded in fp32). ddp
    needs nothing: the Trainer wraps the model in DDP when WORLD_SIZE > 1.
    """
    if settings.parallelism != "fsdp":
        return {}
    config = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": [type(model.model.layers[0]).__name__],
        "reshard_after_forward": True,
        # Each process writes its shard: no process ever holds the whole optimizer state.
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    # The Trainer runs every micro-batch but a step's last under `accelerator.no_sync` (transformers/trainer.py, the
    # inner loop of `_inner_training_loop`), which under FSDP2 is `set_requires_gradient_sync(False)` (accelerate's
    # `Accelerator.no_sync`): each rank would then hold the whole model's unsharded gradients through the step, in
    # bf16 (2 bytes a parameter: 9 GB for a 4.5B student, 16 GB for the 8B teacher's correction) or twice that in
    # fp32. sync_each_batch (which the same loop checks first) reduce-scatters after every micro-batch instead, and
    # FSDP2 adds each result to the fp32 sharded gradient (`foreach_reduce`, torch/distributed/fsdp/_fully_shard/
    # _fsdp_collectives.py): one reduce-scatter of the gradients per micro-batch, overlapped with the backward.
    accumulation = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": config, "accelerator_config": accumulation}


def _fsdp_mixed_precision(bf16: bool):
    """FSDP2's mixed precision policy: compute in bf16 when `bf16`, reduce gradients in fp32.

    For a bf16 run accelerate's own policy is `param_dtype = reduce_dtype = bf16`
    (`FullyShardedDataParallelPlugin.set_mixed_precision`, accelerate/utils/dataclasses.py), which sums every
    rank's gradients in bf16 (8 significant bits). Megatron and NeMo reduce and accumulate in fp32; so do we. A
    policy given to the plugin is kept: `set_mixed_precision` replaces only a missing one (or a dict).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)


class LMTrainer(Trainer):
    """Causal-LM fine-tuning on packed sequences: labels are the inputs (the model shifts them)."""

    ctx: _Context | None = None
    settings: DistillConfig | None = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            # accelerate turns FSDP on for GPU-like devices only, and silently runs DDP on CPU processes; FSDP2
            # itself shards over gloo on CPU. Turning it on here runs the GPU code path on CPU, so that the
            # sharded path is what the CPU tests exercise.
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.accelerator.state.distributed_type = DistributedType.FSDP
            # Also where AcceleratorState's constructor records it on GPUs (the end of its __init__, accelerate/
            # state.py): every later AcceleratorState() (the prepared optimizer makes one) copies PartialState's
            # type over its own, and the training loop would then see MULTI_CPU (no FSDP2 `no_sync`, for one).
            PartialState().distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        out = model(input_ids=ids, labels=ids, use_cache=False)
        return (out.loss, out) if return_outputs else out.loss


class DistillationTrainer(LMTrainer):
    """The student is the Trainer's model (the projections, while it trains, a submodule of it); the teacher
    lives in `self.ctx`."""

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

    @property
    def separate_projections(self) -> bool:
        """The projections train beside the student rather than as its submodule (see `distill`)."""
        return self.ctx is not None and self.ctx.projections is not None and not hasattr(self.model, PROJECTIONS)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.separate_projections:
            params = list(self.ctx.projections.parameters())
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # Outside the DDP-wrapped student, their gradients are averaged here, once per optimizer step.
                optimizer.register_step_pre_hook(lambda *_: _average_gradients(params))
        return optimizer

    def _save_checkpoint(self, model, trial):
        if self.separate_projections and self.args.should_save:
            # Written first: trainer_state.json (the Trainer's last write) then marks a whole checkpoint.
            path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}" / "projections.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.ctx.projections.state_dict(), path)
        super()._save_checkpoint(model, trial)

    def load_projections(self, checkpoint):
        self.ctx.projections.load_state_dict(torch.load(Path(checkpoint) / "projections.pt"))


def _average_gradients(params) -> None:
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


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


def run_digest(step: str, inputs: list, settings: TrainingConfig) -> str:
    """The digest of a run's identity (inputs' content hashes and settings): it names the run's checkpoint
    directory under $SECATEURS_CHECKPOINTS and its TrainJob."""
    return json_digest(_run_identity(step, inputs, settings))


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
    """The newest checkpoint that is whole: its trainer_state.json parses and every RNG state in it loads.

    A run killed while writing a checkpoint leaves a partial one behind; transformers' `get_last_checkpoint`
    would pick it and the resume would fail, so partial ones are removed (their steps are recomputed) instead.
    The Trainer writes the model and optimizer state (together, under FSDP), then each process its own
    `rng_state_<rank>.pth` while the main process writes trainer_state.json, with no barrier between them: a rank
    killed in its RNG write leaves a truncated file beside a whole trainer state, and resuming from it fails in
    `torch.load` on that rank.
    """
    import pickle

    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_pt_utils import safe_globals
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    by_step = {
        int(n): p for p in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (n := p.name.rsplit("-", 1)[1]).isdigit()
    }
    for path in (by_step[step] for step in sorted(by_step, reverse=True)):
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
            for rng in path.glob("rng_state*.pth"):
                with safe_globals():  # loaded as the Trainer's resume loads it (numpy's RNG state allowed)
                    torch.load(rng, weights_only=True)
            return str(path)
        except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError):
            warnings.warn(f"removing {path}: incomplete (the run was stopped while writing it)", stacklevel=2)
            shutil.rmtree(path)
    return None


def _kept_layers(student_dir) -> list[int] | None:
    """Teacher layers a depth-pruned student kept (from its prune manifest), for the default layer mapping."""
    report = read_manifest(student_dir).get("report", {})
    return report.get("kept_layers") if report.get("dropped_layers") else None


def _on_main_process(write) -> None:
    """Call `write()` (which writes the output) in the main process only; every process waits until it is done,
    so none reports success before the output exists (and none hangs when it fails)."""
    from accelerate import PartialState

    state = PartialState()
    try:
        state.on_main_process(write)()
    finally:
        state.wait_for_everyone()


def _validation_loss(model_dir: Path, dd, sequences: int, batch_size: int) -> float:
    """The validation loss of the checkpoint just written to MODEL_DIR over SEQUENCES spread over the held-out
    split, in the main process: on its GPU in bf16 (fp32 without one). Read back from the checkpoint, so it is the
    model as written, whether the run was one process, torchrun's or a TrainJob's nodes (whose watching pod holds
    no GPU to score it afterwards)."""
    from secateurs.evaluate import validation_loss

    model = load_frozen(model_dir)
    cuda = model.device.type == "cuda"
    try:
        return validation_loss(model, dd["validation"].spread(sequences), batch_size)
    finally:
        del model
        if cuda:
            torch.cuda.empty_cache()


def _save(model, tokenizer, out: Path, report: dict, weights: dict | None = None, save_dtype: str = "float32") -> None:
    """The trained model as a stock checkpoint in `save_dtype`; `weights`: its gathered state dict when it is
    sharded."""
    from secateurs.checkpoint import save_checkpoint

    model.config.use_cache = True
    if hasattr(model, PROJECTIONS):
        delattr(model, PROJECTIONS)
    if weights is not None:
        model = _unsharded(model.config, weights)
    save_checkpoint(model.to(getattr(torch, save_dtype)), tokenizer, out)
    (out / "train_log.json").write_text(json.dumps(report.get("log_history", []), indent=1))


def _unsharded(config, weights: dict):
    """A plain model of `config` holding `weights` (an FSDP model's gathered state dict): the FSDP-wrapped module
    itself cannot be saved as a stock checkpoint (its class is FSDP's subclass and its parameters are shards)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters on the meta device (assigned below), buffers (the rotary frequencies) made as usual.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    # Copies: the gathered tensors can share storage that FSDP frees or reuses.
    weights = {k: v.detach().to(torch.float32).clone() for k, v in weights.items()
               if not k.startswith(PROJECTIONS + ".")}  # fmt: skip
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise TrainingError(f"gathered weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()