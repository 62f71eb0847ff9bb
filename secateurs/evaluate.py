"""Evaluation (recipe step 5): how much a model lost, on held-out text and on downstream tasks.

Consumes a model checkpoint and a prepared dataset (made with the model's tokenizer); produces a metrics artifact:
a directory holding `metrics.json` and the usual `secateurs.json` manifest (whose `report` repeats the metrics).
`metrics.json` reads:

    {"validation_loss": 2.91, "perplexity": 18.4, "validation_sequences": 80, "validation_tokens": 10160,
     "parameters": 134515008,
     "tasks": {"lambada-docs": {"acc": 0.31, "log_likelihood": -3.2, "perplexity": 24.5, "n": 200}, ...}}

`validation_loss` is the mean next-token cross-entropy (nats) over every predicted token of the dataset's
validation split, `perplexity` is exactly `exp(validation_loss)`, `validation_tokens` counts the predicted tokens.

Every task is scored by the LM Evaluation Harness (`lm_eval.simple_evaluate` on the loaded model; the `eval`
extra). Tasks are named three ways:
- `lambada-docs`, built in and offline: LAMBADA-style last-word prediction on passages of the validation split
  (`secateurs.eval_tasks.lambada_docs_items`). The items depend only on the dataset and its tokenizer, which
  `check_matches` makes the model's, so a teacher and its students evaluated on one dataset answer the same items.
- a path to a task YAML. Either a secateurs task file (a JSONL of items; format in `secateurs.eval_tasks`) or an
  lm-eval task file (it has a `task:` key), loaded with the file's directory as include path.
- an lm-eval registry name (`hellaswag`, `mmlu`, `winogrande`, ...), optionally with a few-shot count
  (`mmlu:5`). Needs the Hugging Face hub (or its datasets already cached with HF_DATASETS_OFFLINE=1).

`lambada-docs` and secateurs task files become generated lm-eval task YAMLs over local JSONL (`secateurs.eval_tasks`),
so they run offline. A last_word task reports `acc` (greedy decoding reproduces every token of the target), the
mean `log_likelihood` of the target (nats) and `perplexity` = exp(-mean log-likelihood), lm-eval's LAMBADA
metrics; a multiple_choice task reports `acc` (argmax of each choice's summed log-probability) and `acc_norm`
(the same sum divided by the choice's length in characters). lm-eval tasks report their own metrics. Every task
also reports `n`, the items scored.

Every task is resolved and its items built and loaded before the model loads, so an unknown task, a bad task file,
a missing lm-eval, an unreachable hub or a dataset of another tokenizer fails in one line without the expensive
part. The model runs in bfloat16 on CUDA and float32 on CPU; log-probabilities are computed in float32.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from secateurs.checkpoint import check_checkpoint_dir, hub_offline, load_frozen, load_tokenizer
from secateurs.config import EvaluateConfig
from secateurs.data import check_matches, load_packed
from secateurs.eval_tasks import (
    LAMBADA_DOCS_ITEMS,
    LAMBADA_SOURCE_TOKENS,
    PASSAGE_CHARS,
    EvaluationError,
    lambada_docs_items,
    read_task_file,
    write_task,
)
from secateurs.families import parameter_count
from secateurs.files import atomic_output
from secateurs.losses import IGNORE_INDEX, _logits_fp32
from secateurs.manifest import write_manifest

METRICS_FILE = "metrics.json"
# Positions whose logits `validation_loss` forms at once: one [2048, V] fp32 buffer, 1 GiB at a 128k vocabulary
# (the KD loss's default chunk, `DistillConfig.kd_chunk_size`, which ran as fast as full logits on an H200). The
# memory plan counts this chunk (`secateurs.plan.LOSS_CHUNK_TOKENS` repeats the number: the plan imports no torch).
LOSS_CHUNK_TOKENS = 2048
BUILTIN_TASKS = ("lambada-docs",)
# A directory of lm-eval task files that stands in for lm-eval's registry (see `_lm_eval_registry`).
LM_EVAL_TASKS_ENV = "SECATEURS_LM_EVAL_TASKS"
_INSTALL = "pip install 'secateurs[eval]'"


@dataclass
class Task:
    """A resolved task. `kind`: builtin or local (secateurs' own, generated as lm-eval YAMLs) or lm-eval (a
    registry name or an lm-eval task file); `type` says how secateurs' own tasks are scored."""

    name: str
    kind: Literal["builtin", "local", "lm-eval"]
    type: Literal["last_word", "multiple_choice", "lm-eval"] = "lm-eval"
    docs: list | None = None  # the items of a local task file, checked
    target_delimiter: str = " "
    num_fewshot: int | None = None
    lm_eval_manager: object = None  # the lm_eval TaskManager that knows the name
    lm_eval_task: object = None  # the loaded lm_eval Task or Group, with its dataset


def run(
    model_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    settings: EvaluateConfig | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate MODEL on DATA's validation split and on TASKS; write the metrics artifact directory OUT.

    Args:
        model_dir: checkpoint directory.
        data_dir: dataset made by `prepare-data` with the model's tokenizer.
        out: output directory; receives `metrics.json` and `secateurs.json` (replaced atomically).
        settings: tasks (names, task YAML paths, or lm-eval task names; `name:N` sets N few-shot examples),
            batch size, the cap on validation sequences for the loss (spread evenly over the split) and on the
            items of every task; `EvaluateConfig` says each.
        device: torch device; default cuda when available.
    Returns:
        The metrics (the content of metrics.json).
    """
    settings = settings or EvaluateConfig()
    batch_size, limit = settings.batch_size, settings.limit
    # Cheap checks first (task names and files, tokenizer, dataset, checkpoint files), then the task items
    # (lm-eval datasets may download), and only then the model.
    resolved = resolve_tasks(settings.tasks)
    tokenizer = load_tokenizer(model_dir)
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, tokenizer, where=f"dataset {data_dir}")
    check_checkpoint_dir(model_dir)
    # The generated task files and their datasets cache live until the tasks are scored.
    with tempfile.TemporaryDirectory(prefix="secateurs-tasks-") as generated:
        # Task items come from the whole split whatever max_sequences is, so runs with different caps stay comparable.
        load_tasks(resolved, Path(generated), tokenizer, dd["validation"], limit)
        validation = dd["validation"].spread(settings.max_sequences)

        model = load_frozen(model_dir, device)
        loss = validation_loss(model, validation, batch_size, progress="validation loss")
        metrics = {
            "validation_loss": loss,
            "perplexity": _exp(loss),
            "validation_sequences": len(validation),
            "validation_tokens": int(validation[:, 1:].numel()),
            "parameters": parameter_count(model),
            "tasks": score_tasks(resolved, model, tokenizer, batch_size, limit),
        }
    with atomic_output(out) as tmp:
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        write_manifest(
            tmp,
            "evaluate",
            inputs={"model": model_dir, "data": data_dir},
            config=settings.model_dump(),
            report=metrics,
        )
    return metrics


def read_metrics(path: str | Path) -> dict:
    """The metrics of an artifact written by `run`."""
    f = Path(path) / METRICS_FILE
    if not f.is_file():
        raise EvaluationError(
            f"{path} is not a metrics artifact made by `secateurs evaluate` ({METRICS_FILE} is missing)"
        )
    return json.loads(f.read_text())


@torch.inference_mode()
def validation_loss(
    model,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    progress: str | None = None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> float:
    """Mean next-token cross-entropy over every predicted token of the sequences, in nats.

    The loss is formed from the final hidden states through the LM head `chunk_tokens` positions at a time, as the
    chunked KD loss does (`secateurs.losses`): at a batch of 8 x 8192 tokens and a 128k vocabulary the
    [batch, seq, vocab] logits are 16 GiB in bf16 and 32 GiB in fp32, and a plain `cross_entropy` on them holds
    four such copies (the logits, their shifted flat copy, its fp32 copy, the log-softmax). Here one
    [chunk_tokens, vocab] fp32 buffer exists at a time (1 GiB at 2048 tokens), beside the [batch, seq, hidden]
    final hidden states. The supported families apply the LM head alone (no bias, no logit scaling or
    soft-capping), so `lm_head(h)` is exactly the model's logits.

    Args:
        model: a causal LM of a supported family (`model.model` the decoder, `model.lm_head` the head).
        input_ids: [sequences, seq_len] token ids (a tensor, or a `PackedSplit` that slices like one).
        batch_size: sequences per forward pass.
        progress: name of a progress bar; None shows none.
        chunk_tokens: positions whose logits are formed at once.
    Returns:
        The sum over every position but each sequence's last of the cross-entropy against the next token, divided
        by the number of those positions (`sequences x (seq_len - 1)`).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = next(model.parameters()).device
    weight = model.lm_head.weight  # [V, H]
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in tqdm(range(0, len(input_ids), batch_size), desc=progress, disable=progress is None, unit="batch"):
        batch = input_ids[start : start + batch_size].to(device)  # [B, S]
        hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state  # [B, S, H]
        # Position s predicts token s + 1; each sequence's last position predicts nothing. The flat view leaves the
        # hidden states uncopied, so those B positions ride along in the chunks and are masked out of the sum.
        hidden = hidden.flatten(0, 1)  # [B * S, H], a view
        targets = torch.full_like(batch, IGNORE_INDEX)
        targets[:, :-1] = batch[:, 1:]
        targets = targets.flatten()  # [B * S]
        for first in range(0, hidden.shape[0], chunk_tokens):
            logits = _logits_fp32(hidden[first : first + chunk_tokens], weight)  # [c, V] fp32
            total += _cross_entropy_sum(logits, targets[first : first + chunk_tokens])
            del logits
        count += batch[:, 1:].numel()
    return total.item() / count


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)` in fp64, without its
    [c, V] log-softmax: `logsumexp(logits) - logits[target]` per position, the log-sum-exp taken in place.

    Args:
        logits: [c, V] fp32; consumed (overwritten).
        targets: [c] token ids, IGNORE_INDEX where a position has none.
    """
    picked = logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)  # [c]
    peak = logits.amax(1, keepdim=True)  # [c, 1]
    log_sum_exp = logits.sub_(peak).exp_().sum(1).log_().add_(peak.squeeze(1))  # [c]
    per_position = torch.where(targets != IGNORE_INDEX, log_sum_exp - picked, 0.0)
    return per_position.sum(dtype=torch.float64)


# --------------------------------------------------------------------------------------------- task resolution


def resolve_tasks(names: tuple[str, ...] | list[str]) -> list[Task]:
    """Turn task names into `Task`s without touching any model: unknown names, bad files and a missing lm-eval
    fail here."""
    if not names:
        raise EvaluationError("no tasks given (built-in tasks: " + ", ".join(BUILTIN_TASKS) + ")")
    resolved = []
    for raw in names:
        name, fewshot = _split_fewshot(raw)
        if name in BUILTIN_TASKS:
            task = Task(name, "builtin", "last_word")
        elif name.endswith((".yaml", ".yml")) or os.sep in name or Path(name).is_file():
            task = _resolve_task_file(Path(name))
        else:
            task = _resolve_lm_eval_name(name)
        if fewshot is not None and task.kind != "lm-eval":
            # secateurs' own tasks have a test split only: lm-eval would draw the examples from the items scored.
            raise EvaluationError(f"task {raw!r}: a few-shot count applies only to lm-eval tasks of the registry or a file")
        task.num_fewshot = fewshot
        resolved.append(task)
    given = [task.name for task in resolved]
    if twice := next((name for name in given if given.count(name) > 1), None):
        raise EvaluationError(f"task {twice!r} is given twice")
    if not _lm_eval_installed():
        raise EvaluationError(f"tasks are scored by lm-eval, which is not installed: {_INSTALL}")
    return resolved


def _lm_eval_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _split_fewshot(raw: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+):(\d+)", raw)
    return (m.group(1), int(m.group(2))) if m else (raw, None)


def _resolve_task_file(path: Path) -> Task:
    import yaml

    if not path.is_file():
        raise EvaluationError(f"task file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EvaluationError(f"task file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise EvaluationError(f"task file {path} must hold a mapping (name, type, jsonl, ...)")
    if "task" in spec:
        return _resolve_lm_eval_file(path, spec)
    local, docs = read_task_file(path, spec)
    return Task(local.name or path.stem, "local", local.type, docs, local.target_delimiter)


def _unknown(name: str, why: str) -> EvaluationError:
    return EvaluationError(
        f"unknown task {name!r}: built-in tasks: {', '.join(BUILTIN_TASKS)}; or a path to a task YAML; "
        f"or an lm-eval task name ({why})"
    )


def _resolve_lm_eval_name(name: str) -> Task:
    if not _lm_eval_installed():
        raise _unknown(name, f"lm-eval not installed: {_INSTALL}")
    manager = _lm_eval_registry()
    if name not in manager.all_tasks:
        raise _unknown(name, f"lm-eval {_lm_eval_version()} has none called {name!r}")
    if name in manager.all_tags:
        # A tag is a loose list of tasks with no aggregate score; one metrics entry per name needs a task or group.
        raise EvaluationError(f"lm-eval name {name!r} is a tag, not a task or group: name its tasks instead")
    _require_hub_for(name)
    return Task(name, "lm-eval", lm_eval_manager=manager)


def _resolve_lm_eval_file(path: Path, spec: dict) -> Task:
    if not _lm_eval_installed():
        raise EvaluationError(f"task file {path} is an lm-eval task, but lm-eval is not installed: {_INSTALL}")
    name = str(spec["task"])
    manager = _task_manager(path.parent.resolve())
    if name not in manager.all_tasks:
        raise EvaluationError(f"lm-eval task file {path} does not define a usable task {name!r}")
    return Task(name, "lm-eval", lm_eval_manager=manager)


def _task_manager(directory: Path):
    """An lm-eval TaskManager of the task files in DIRECTORY alone: indexing lm-eval's ~15k bundled task files
    costs ~20 s of CPU."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=str(directory))


@functools.cache
def _lm_eval_registry():
    """lm-eval's whole registry; building its index reads every bundled task YAML, so once per process.

    With `LM_EVAL_TASKS_ENV` set, the task files of that directory instead: registry tasks whose dataset is a local
    copy (a rehearsal's, `secateurs.rehearse.write_task_overrides`, each including the registry's own definition)."""
    from lm_eval.tasks import TaskManager

    if os.environ.get(LM_EVAL_TASKS_ENV):
        return TaskManager(include_defaults=False, include_path=os.environ[LM_EVAL_TASKS_ENV])
    return TaskManager()


def _lm_eval_version() -> str:
    import importlib.metadata as md

    return md.version("lm_eval")


def _require_hub_for(name: str) -> None:
    """Registry tasks download their datasets; fail now, naming the task, when that cannot work."""
    if hub_offline("HF_DATASETS_OFFLINE"):
        return  # offline mode: a cached dataset may serve; `_load_lm_eval_task` says so when it does not
    from secateurs.checkpoint import CheckpointError, _require_hub

    try:
        _require_hub(f"the dataset of lm-eval task {name!r}")
    except CheckpointError as e:
        raise EvaluationError(f"{e}; set HF_DATASETS_OFFLINE=1 to use a cached copy") from None


# ------------------------------------------------------------------------------------------------ task loading


def load_tasks(tasks: list[Task], generated: Path, tokenizer, validation, limit: int | None) -> None:
    """Write secateurs' own tasks as lm-eval task files in GENERATED, then load every task and its dataset.

    Args:
        validation: the dataset's validation split (a `secateurs.data.PackedSplit`), the source of lambada-docs.
    """
    own = [task for task in tasks if task.kind != "lm-eval"]
    for i, task in enumerate(own):
        if task.kind == "builtin":
            # Only the first LAMBADA_SOURCE_TOKENS tokens are read.
            ids = validation.head(max(1, LAMBADA_SOURCE_TOKENS // validation.seq_len))
            task.docs = lambada_docs_items(ids, tokenizer, min(limit or LAMBADA_DOCS_ITEMS, LAMBADA_DOCS_ITEMS))
            if not task.docs:
                raise EvaluationError(
                    f"task {task.name}: the validation split holds no prose passage of {PASSAGE_CHARS[0]}-"
                    f"{PASSAGE_CHARS[1]} characters ending in a word; prepare the dataset with more validation text"
                )
        write_task(generated / f"task{i}", task.name, task.type, task.docs, task.target_delimiter)
    if own:
        manager = _task_manager(generated)
        for task in own:
            task.lm_eval_manager = manager
    for task in tasks:
        task.lm_eval_task = _load_lm_eval_task(task)


def _load_lm_eval_task(task: Task):
    """Load the task and its dataset (download or cache) now: lm-eval itself would do it after the model."""
    where = f"lm-eval task {task.name!r}" if task.kind == "lm-eval" else f"task {task.name!r}"
    try:
        loaded = task.lm_eval_manager.load(task.name)
    except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many types; one line naming the task helps
        text = str(e).strip().splitlines()
        hint = (
            " (the hub is off: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, and no cached copy)"
            if hub_offline("HF_DATASETS_OFFLINE")
            else ""
        )
        raise EvaluationError(
            f"{where}: cannot load its dataset{hint}: {type(e).__name__}: {text[0] if text else ''}"
        ) from None
    # A group (mmlu) comes back as itself plus everything under it; evaluate the group.
    return loaded["groups"].get(task.name) or loaded["tasks"][task.name]


# -------------------------------------------------------------------------------------------------- scoring


def score_tasks(tasks: list[Task], model, tokenizer, batch_size: int, limit: int | None) -> dict:
    """Every task's metrics plus `n`, the number of items scored, by name."""
    from lm_eval.models.huggingface import HFLM

    # HFLM right-pads a batch and reads only the positions before the padding, which a causal model computes
    # without looking at it. float32 log-softmax: in bfloat16 a sum of log-probabilities loses its third digit.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)
    return {task.name: _score(task, lm, limit) for task in tasks}


def _score(task: Task, lm, limit: int | None) -> dict:
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task.lm_eval_task],
        num_fewshot=task.num_fewshot,
        limit=limit,
        task_manager=task.lm_eval_manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    entry = results.get("groups", {}).get(task.name) or results["results"].get(task.name)
    if entry is None:
        raise EvaluationError(f"lm-eval returned no result for task {task.name!r}")
    metrics = {}
    for key, value in entry.items():
        # Metrics are "name,filter"; other keys (alias, sample_len) are not, and n below counts the items.
        metric, _, filt = key.partition(",")
        if filt and isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric:
            metrics[metric if filt == "none" else f"{metric}_{filt}"] = value
    if task.type == "last_word":
        # The generated task averages the per-item log-likelihoods under lm-eval's name `perplexity` (eval_tasks).
        ll = metrics.pop("perplexity")
        metrics = {"acc": metrics["acc"], "log_likelihood": ll, "perplexity": _exp(-ll)}
    # n: the items of every leaf task under the name (a group such as mmlu nests groups of tasks).
    counts, children = results.get("n-samples", {}), results.get("group_subtasks", {})

    def items(name: str) -> int:
        if name in counts:
            return counts[name].get("effective", 0)
        return sum(items(child) for child in children.get(name, []))

    metrics["n"] = items(task.name)
    return metrics


def _exp(x: float) -> float:
    """exp that saturates to inf (a broken model's perplexity) instead of raising OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


__all__ = [
    "BUILTIN_TASKS",
    "EvaluationError",
    "lambada_docs_items",
    "read_metrics",
    "resolve_tasks",
    "run",
    "validation_loss",
]
