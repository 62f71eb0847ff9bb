"""One distillation run of one implementation, for bench/peers.py: `python peer_run.py IMPL SPEC.json`.

IMPL is `ours` (secateurs.train.distill), `plain` (forward both, full-vocabulary KL, backward), `trl` (TRL's
GKDTrainer, lmbda=0, beta=0) or `nemo` (NeMo AutoModel's KnowledgeDistillationRecipeForNextTokenPrediction,
kd_ratio=1). It runs in the implementation's own virtual environment, under torchrun when the spec asks for more
than one process, so it imports only torch, transformers and the implementation itself at module level.

Every implementation sees the same sequences at the same step: the spec's `train_tokens` file holds the training
split in the order a stock Trainer with `data_seed=seed` draws it (ours and TRL are Trainers and draw it
themselves from `train_split`; the order they drew is recorded and compared by bench/peers.py), and step k uses
rows [k * global_batch, (k + 1) * global_batch). Each process writes `rank<r>.json` into the spec's `out`:
the training KL per step, the learning rate after each step, the validation loss at the spec's steps (the same
function for everyone, `validation_loss` below), each step's wall time and the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def main() -> int:
    impl, spec_path = sys.argv[1], Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec.get("threads_per_process") or torch.get_num_threads())
    runners = {"ours": run_ours, "plain": run_plain, "trl": run_trl, "nemo": run_nemo, "nemo-loss": run_nemo_loss}
    record = Record(spec)
    runners[impl](spec, record)
    record.write(impl)
    return 0


# ---- what every implementation shares ------------------------------------------------------------------------


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_tokens(path: str | Path) -> torch.Tensor:
    """[sequences, seq_len] int64 token ids saved by bench/peers.py with numpy."""
    return torch.from_numpy(np.load(path).astype(np.int64))


def step_rows(tokens: torch.Tensor, step: int, global_batch: int, process: int, processes: int) -> torch.Tensor:
    """This process's rows of global step `step` (0-based): every `processes`-th row of the step's global batch,
    as a DistributedSampler without shuffling deals them."""
    batch = tokens[step * global_batch : (step + 1) * global_batch]
    return batch[process::processes]


@torch.no_grad()
def validation_loss(model, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) of `model` over every position but each sequence's last, in fp32.

    Args:
        model: a causal LM returning `.logits` [batch, seq, vocab].
        input_ids: [sequences, seq_len] token ids.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits.float()  # [b, L, V]
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def teacher_dtype(spec: dict) -> torch.dtype:
    return torch.bfloat16 if spec["device"] == "cuda" else torch.float32


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak resident set, which is what a CPU run's memory limit meets.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Record:
    """What one process measured; `write` puts it in <out>/rank<r>.json."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.val_tokens = load_tokens(spec["val_tokens"])
        self.train_kl: list[float] = []
        self.lr: list[float] = []
        self.step_seconds: list[float] = []
        self.validation: dict[int, float] = {}
        self.order: list[int] | None = None
        self.notes: dict = {}

    def wants_validation(self, step: int) -> bool:
        return step in self.spec["eval_steps"]

    def validate(self, step: int, model) -> None:
        self.validation[step] = validation_loss(model, self.val_tokens)

    def write(self, impl: str) -> None:
        out = Path(self.spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank()}.json").write_text(json.dumps({
            "impl": impl, "rank": rank(), "world": world(), "train_kl": self.train_kl, "lr": self.lr,
            "step_seconds": self.step_seconds, "validation": self.validation, "order": self.order,
            "peak_rss_mib": peak_rss_mib(), "notes": self.notes,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }, indent=1))  # fmt: skip


def trainer_callback(record: Record, train_rows: torch.Tensor):
    """A TrainerCallback (for the two Trainer-based implementations) that times each optimizer step, keeps the
    logged loss and learning rate, reads the validation loss after the spec's steps, and records the order in which
    the Trainer's own dataloader deals the training split (row indices of `train_rows`)."""
    from transformers import TrainerCallback

    index = {bytes(row.numpy().astype(np.int64).tobytes()): i for i, row in enumerate(train_rows)}

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            # The sampler reseeds itself from data_seed + epoch on every pass (accelerate's SeedableRandomSampler),
            # so this pass deals what training then deals. Only the first epoch is read: the runs are shorter.
            order = []
            for batch in train_dataloader:
                order += [index[bytes(row.numpy().astype(np.int64).tobytes())] for row in batch["input_ids"]]
                if len(order) >= state.max_steps * record.spec["global_batch"] // world():
                    break
            record.order = order

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record.step_seconds.append(time.perf_counter() - self.started)
            if record.wants_validation(state.global_step):
                record.validate(state.global_step, model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.train_kl.append(logs["loss"])
                record.lr.append(logs["learning_rate"])

    return Measure()


# ---- ours ----------------------------------------------------------------------------------------------------


def run_ours(spec: dict, record: Record) -> None:
    from secateurs import train
    from secateurs.config import DistillConfig
    from secateurs.data import load_packed

    settings = DistillConfig(
        max_steps=spec["steps"], micro_batch_size=spec["micro_batch"], global_batch_size=spec["global_batch"],
        learning_rate=spec["lr"], min_learning_rate=spec["min_lr"], warmup_steps=spec["warmup"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"], temperature=spec["temperature"],
        ce_alpha=0.0, seed=spec["seed"], logging_steps=1, save_steps=spec["steps"], save_total_limit=1,
        parallelism=spec["parallelism"],
    )  # fmt: skip
    split = load_packed(spec["data"])[0]["train"]
    rows = split.head(None)
    out = Path(spec["out"]) / "model"
    os.environ["SECATEURS_CHECKPOINTS"] = str(Path(spec["out"]) / "checkpoints")
    train.distill(spec["teacher"], spec["student"], spec["data"], out, settings,
                  callbacks=[trainer_callback(record, rows)])  # fmt: skip


# ---- a plain PyTorch loop, and NeMo AutoModel's loss and schedule in it ------------------------------------------


def kd_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels that mark every position for the KD loss, as ours computes it: the next token, and at the last
    position (which has none) the token itself. Ours (`secateurs.train.DistillationTrainer.compute_loss` ->
    `losses.fused_kd_loss` with ce_alpha=0) distils all L positions, the last one included: the teacher's
    distribution there is a target like any other. NeMo's KDLoss and the plain loop mask only IGNORE_INDEX, so
    a real token at the last position makes them cover the same L positions; with kd_ratio=1 no CE reads it.
    TRL cannot: GKDTrainer.compute_loss always drops the last position (`logits[:, :-1, :]`)."""
    labels = ids.clone()
    labels[:, :-1] = ids[:, 1:]
    return labels


def full_vocabulary_kl(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    """Sum over the positions whose label is not IGNORE_INDEX of KL(teacher || student) over the whole vocabulary,
    at temperature T with the T^2 factor. Logits [b, L, V], labels [b, L]."""
    keep = labels != IGNORE_INDEX
    s, t = student_logits[keep] / temperature, teacher_logits[keep] / temperature  # [n, V]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2


def run_plain(spec: dict, record: Record) -> None:
    """Forward both models, full-vocabulary forward KL per token, backward; DDP over gloo with 2 processes."""
    from transformers import get_scheduler

    def make_scheduler(optimizer):
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=spec["warmup"],
                             num_training_steps=spec["steps"],
                             scheduler_specific_kwargs={"min_lr": spec["min_lr"]})  # fmt: skip

    def kd_loss(student_logits, teacher_logits, labels, predicted):
        return full_vocabulary_kl(student_logits, teacher_logits, labels, spec["temperature"]) / predicted

    run_loop(spec, record, kd_loss, make_scheduler, lambda scheduler: scheduler.step())


def run_nemo_loss(spec: dict, record: Record) -> None:
    """NeMo AutoModel's KD loss (`KDLoss`, fp32 upcast) and LR schedule (`OptimizerParamScheduler`, what its
    `lr_scheduler` config builds) in the loop above, in NeMo's environment (its transformers pin). Its recipe itself
    needs CUDA (`run_nemo`), so this is what of NeMo runs on a CPU."""
    from nemo_automodel.components.loss.kd_loss import KDLoss
    from nemo_automodel.components.optim.scheduler import OptimizerParamScheduler

    loss_fn = KDLoss(ignore_index=IGNORE_INDEX, temperature=spec["temperature"], fp32_upcast=True)

    def make_scheduler(optimizer):
        # The values nemo_automodel/components/optim/optimizer.py LRSchedulerConfig.build passes for our config.
        return OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=spec["lr"], min_lr=spec["min_lr"], lr_warmup_steps=spec["warmup"],
            lr_decay_steps=spec["steps"], lr_decay_style="cosine", start_wd=spec["weight_decay"],
            end_wd=spec["weight_decay"], wd_incr_steps=spec["steps"], wd_incr_style="constant",
        )  # fmt: skip

    def kd_loss(student_logits, teacher_logits, labels, predicted):
        # As kd.py `_forward_backward_step` calls it: normalised by the label tokens of the whole optimizer step.
        return loss_fn(student_logits, teacher_logits, labels, num_batch_labels=predicted)

    # kd.py `_run_train_optim_step` steps its schedulers with `scheduler.step(1)` after the optimizer.
    run_loop(spec, record, kd_loss, make_scheduler, lambda scheduler: scheduler.step(1))


def run_loop(spec: dict, record: Record, kd_loss, make_scheduler, step_scheduler) -> None:
    """Per optimizer step: each micro-batch's teacher logits (no grad) and student logits, `kd_loss` over its
    positions divided by those of the whole global batch, backward; clip, AdamW, schedule.

    `kd_loss(student_logits, teacher_logits, labels, predicted)` gets logits [b, L, V], labels [b, L]
    (`kd_labels`) and the global batch's count of distilled positions."""
    from transformers import AutoModelForCausalLM

    processes, cuda = world(), spec["device"] == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if processes > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    # As ours: the frozen teacher in the dtype it runs in (bf16 on GPUs), the student's weights fp32 with bf16
    # autocast compute on GPUs (the Trainer's bf16=True), fp32 throughout on CPU.
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=teacher_dtype(spec)).to(device)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32).to(device).train()
    model = torch.nn.parallel.DistributedDataParallel(student) if processes > 1 else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=spec["weight_decay"], fused=True)  # fmt: skip
    scheduler = make_scheduler(optimizer)
    tokens = load_tokens(spec["train_tokens"])
    micro, g = spec["micro_batch"], spec["global_batch"]
    predicted = g * tokens.shape[1]  # positions distilled in one global batch (every position: `kd_labels`)
    for step in range(spec["steps"]):
        started = time.perf_counter()
        rows = step_rows(tokens, step, g, rank(), processes)
        kl_sum = torch.zeros((), device=device)
        for start in range(0, len(rows), micro):
            ids = rows[start : start + micro].to(device)
            labels = kd_labels(ids)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
                s_logits = model(input_ids=ids).logits
            loss = kd_loss(s_logits, t_logits, labels, predicted)
            # DDP averages gradients over processes; scaling by their number makes the step's gradient that of
            # the global per-token mean (what kd.py does: `(local_loss * dp_group_size).backward()`).
            (loss * processes).backward()
            kl_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(student.parameters(), spec["max_grad_norm"])
        optimizer.step()
        step_scheduler(scheduler)
        optimizer.zero_grad(set_to_none=True)
        if processes > 1:
            torch.distributed.all_reduce(kl_sum)
        if cuda:
            torch.cuda.synchronize()
        record.step_seconds.append(time.perf_counter() - started)
        record.train_kl.append(kl_sum.item())
        record.lr.append(optimizer.param_groups[0]["lr"])
        if record.wants_validation(step + 1):
            record.validate(step + 1, student)
    if processes > 1:
        torch.distributed.destroy_process_group()


# ---- TRL -------------------------------------------------------------------------------------------------------


def run_trl(spec: dict, record: Record) -> None:
    """TRL's GKDTrainer off-policy: lmbda=0 (never generate), beta=0 (forward KL(teacher || student))."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    processes, cuda = world(), spec["device"] == "cuda"
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=teacher_dtype(spec))
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    # The whole training split in its stored order: the Trainer's sampler draws from it as ours does.
    rows = load_tokens(spec["train_split_tokens"])
    train = datasets.Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        # Every position is a target (labels == inputs); GKDTrainer.compute_loss shifts them by one.
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    args = GKDConfig(
        output_dir=str(Path(spec["out"]) / "trl"), max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["global_batch"] // (spec["micro_batch"] * processes),
        learning_rate=spec["lr"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": spec["min_lr"]}, warmup_steps=spec["warmup"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"], seed=spec["seed"],
        data_seed=spec["seed"], use_cpu=not cuda, bf16=cuda, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, lmbda=0.0, beta=0.0, temperature=spec["temperature"], max_length=None,
        # SFTConfig (which GKDConfig extends) turns activation checkpointing on by default (trl/trainer/
        # sft_config.py: "`gradient_checkpointing`: Defaults to `True`"); ours and the loops keep activations.
        gradient_checkpointing=False,
    )  # fmt: skip
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                         data_collator=collate, processing_class=tokenizer,
                         callbacks=[trainer_callback(record, rows)])  # fmt: skip
    trainer.train()


# ---- NeMo AutoModel --------------------------------------------------------------------------------------------


def nemo_dataset(tokens: str, **unused):
    """The training sequences in step order, as NeMo's LLM datasets give them, with `kd_labels` as labels."""
    rows = load_tokens(tokens)
    return [{"input_ids": r.tolist(), "labels": l.tolist()} for r, l in zip(rows, kd_labels(rows))]


def run_nemo(spec: dict, record: Record) -> None:
    """NeMo AutoModel's KD recipe driven as its own tests drive it: a config, setup(), run_train_validation_loop().

    CUDA only: nemo-automodel 0.7.0 builds every model on `torch.device("cuda", torch.cuda.current_device())`
    (nemo_automodel/_transformers/auto_model.py `from_pretrained`, recipes/llm/train_ft.py `build_model`) and
    materialises its weights there (components/checkpoint/checkpointing.py `initialize_model_weights`)."""
    if not torch.cuda.is_available():
        raise SystemExit("nemo: NeMo AutoModel's KD recipe builds its models on CUDA only; on CPU run nemo-loss")
    # The config loader imports only allow-listed modules unless user modules are enabled (its documented opt-in,
    # nemo_automodel/components/config/loader.py); our dataset function lives here.
    os.environ["NEMO_ENABLE_USER_MODULES"] = "1"
    from nemo_automodel.components.config.loader import ConfigNode
    from nemo_automodel.recipes.llm.kd import KnowledgeDistillationRecipeForNextTokenPrediction

    # The student's weights fp32 (FSDP2's mixed-precision policy computes in bf16), the frozen teacher bf16: as ours.
    model = {"_target_": "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained", "attn_implementation": "sdpa"}
    cfg = {
        "step_scheduler": {"global_batch_size": spec["global_batch"], "local_batch_size": spec["micro_batch"],
                           "max_steps": spec["steps"], "num_epochs": 1, "ckpt_every_steps": 10**9,
                           "val_every_steps": 10**9},
        "dist_env": {"backend": "nccl", "timeout_minutes": 10},
        "rng": {"_target_": "nemo_automodel.components.training.rng.StatefulRNG", "seed": spec["seed"],
                "ranked": True},
        "model": {**model, "pretrained_model_name_or_path": spec["student"], "torch_dtype": "float32"},
        "teacher_model": {**model, "pretrained_model_name_or_path": spec["teacher"], "torch_dtype": "bfloat16"},
        "checkpoint": {"enabled": False, "checkpoint_dir": str(Path(spec["out"]) / "nemo-checkpoints")},
        "distributed": {"strategy": spec["nemo_strategy"], "dp_size": None, "tp_size": 1, "cp_size": 1,
                        "pp_size": 1},
        "loss_fn": {"_target_": "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy"},
        "kd_ratio": 1.0,
        "kd_loss_fn": {"_target_": "nemo_automodel.components.loss.kd_loss.KDLoss", "ignore_index": IGNORE_INDEX,
                       "temperature": spec["temperature"], "fp32_upcast": True},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": spec["lr"], "betas": [0.9, 0.999], "eps": 1e-8,
                      "weight_decay": spec["weight_decay"], "fused": True},
        # init_lr 0 and decay over all steps: the Trainer's linear warm-up from 0 and cosine to min_lr (the
        # formulas agree step for step: nemo_automodel/components/optim/scheduler.py get_lr).
        "lr_scheduler": {"lr_decay_style": "cosine", "lr_warmup_steps": spec["warmup"], "init_lr": 0.0,
                         "max_lr": spec["lr"], "min_lr": spec["min_lr"], "lr_decay_steps": spec["steps"]},
        "clip_grad_norm": {"max_norm": spec["max_grad_norm"]},
        "dataset": {"_target_": "peer_run.nemo_dataset", "tokens": spec["train_tokens"]},
        "dataloader": {"_target_": "torchdata.stateful_dataloader.StatefulDataLoader",
                       "collate_fn": "nemo_automodel.components.datasets.utils.default_collater", "shuffle": False},
    }  # fmt: skip

    class Measured(KnowledgeDistillationRecipeForNextTokenPrediction):
        """The recipe unchanged; its per-step logging hook also reads our measurements."""

        def log_train_metrics(self, log_data):
            torch.cuda.synchronize()
            now = time.perf_counter()
            record.step_seconds.append(now - self._measure_since)
            record.train_kl.append(log_data.metrics["kd_loss"])
            record.lr.append(log_data.metrics["lr"])
            if record.wants_validation(log_data.step):
                record.validate(log_data.step, self.model_parts[0])
            result = super().log_train_metrics(log_data)
            # The recipe times a step from the end of the previous one: leave our validation out of the next.
            self.timestamp = self._measure_since = time.perf_counter()
            return result

    recipe = Measured(ConfigNode(cfg))
    recipe.setup()
    recipe._measure_since = time.perf_counter()
    recipe.run_train_validation_loop()
    record.notes["nemo_strategy"] = spec["nemo_strategy"]


if __name__ == "__main__":
    sys.exit(main())
