"""Evaluation (recipe step 5): how much a model lost, on held-out text and on downstream tasks.

Consumes a model checkpoint and a prepared dataset (made with the model's tokenizer); produces a metrics artifact:
a directory holding `metrics.json` and the usual `secateurs.json` manifest (whose `report` repeats the metrics).
`metrics.json` reads:

    {"validation_loss": 2.91, "perplexity": 18.4, "validation_sequences": 80, "validation_tokens": 10160,
     "parameters": 134515008,
     "tasks": {"lambada-docs": {"acc": 0.31, "log_likelihood": -3.2, "perplexity": 24.5, "n": 200}, ...}}

`validation_loss` is the mean next-token cross-entropy (nats) over every predicted token of the dataset's
validation split, `perplexity` is exactly `exp(validation_loss)`, `validation_tokens` counts the predicted tokens.

Tasks are named three ways:
- `lambada-docs`, built in and offline: LAMBADA-style last-word prediction on passages of the validation split
  (see `lambada_docs_items`). The items depend only on the dataset and its tokenizer, which `check_matches`
  makes the model's, so a teacher and its students evaluated on one dataset answer the same items.
- a path to a task YAML. Either a secateurs task (keys below) scored here by log-likelihood, or an LM Evaluation
  Harness task file (it has a `task:` key) run through `lm_eval` with the file's directory as include path:

      name: capitals          # key in metrics.json (default: the file name without .yaml)
      type: multiple_choice   # or last_word
      jsonl: capitals.jsonl   # one JSON object per line, path relative to the YAML
      context_field: context  # default "context"
      choices_field: choices  # multiple_choice only; default "choices": a list of strings
      answer_field: answer    # multiple_choice: index of the right choice; last_word: the target text
      target_delimiter: " "   # between context and continuation (lm-eval's default)

  multiple_choice reports `acc` (argmax of each choice's summed log-probability) and `acc_norm` (the same sum
  divided by the choice's length in characters), as lm-eval defines them; last_word reports `acc` (greedy decoding
  reproduces every token of the target), the mean `log_likelihood` of the target and `perplexity` =
  exp(-mean log-likelihood), lm-eval's LAMBADA metrics.
- an lm-eval registry name (`hellaswag`, `mmlu`, `winogrande`, ...), optionally with a few-shot count
  (`mmlu:5`), run by `lm_eval.simple_evaluate` on the loaded model. Needs the `eval` extra and the Hugging Face
  hub (or its datasets already cached with HF_DATASETS_OFFLINE=1).

Every task is resolved and its items built before the model loads, so an unknown task, a bad task file, an
unreachable hub or a dataset of another tokenizer fails in one line without the expensive part. The model runs in
bfloat16 on CUDA and float32 on CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from secateurs.checkpoint import check_checkpoint_dir, load_model, load_tokenizer
from secateurs.config import EvaluateConfig
from secateurs.data import check_matches, load_packed
from secateurs.families import parameter_count
from secateurs.importance import validation_loss
from secateurs.manifest import atomic_output, write_manifest

METRICS_FILE = "metrics.json"
BUILTIN_TASKS = ("lambada-docs",)
# Items of the built-in task: enough for a +-3.5% standard error at 50% accuracy, few enough for a CPU demo.
LAMBADA_DOCS_ITEMS = 200
# Passage length bounds in characters: a few sentences of context, like LAMBADA's passages (which are longer,
# ~4.6 sentences, but our validation splits are small).
PASSAGE_CHARS = (100, 200)
# Validation tokens read for the built-in task: ~4 MB of text, far more than 200 passages need, and a bound on the
# decoding time when the validation split is large.
LAMBADA_SOURCE_TOKENS = 1 << 20


class EvaluationError(ValueError):
    """A task or an evaluation input that cannot be used."""


@dataclass
class Request:
    """One continuation to score: the model reads `context + continuation` and we read the continuation's tokens.

    Attributes:
        context: [c] token ids (c >= 1).
        continuation: [t] token ids (t >= 1).
    """

    context: list[int]
    continuation: list[int]


@dataclass
class LastWordItem:
    """Score `delimiter + target` after `context`."""

    context: str
    target: str
    delimiter: str = " "
    request: Request | None = None


@dataclass
class ChoiceItem:
    """Score each `delimiter + choice` after `context`; `answer` indexes the right choice."""

    context: str
    choices: list[str]
    answer: int
    delimiter: str = " "
    requests: list[Request] = field(default_factory=list)


@dataclass
class Task:
    """A resolved task: `kind` is builtin, local or lm-eval; `items` (or `lm_eval_task`) are filled by
    `build_items`, before the model loads."""

    name: str
    kind: Literal["builtin", "local", "lm-eval"]
    type: str = "last_word"
    items: list = field(default_factory=list)
    num_fewshot: int | None = None
    lm_eval_task: object = None  # the loaded lm_eval Task or Group
    lm_eval_manager: object = None  # the lm_eval TaskManager that knows the name


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
    tasks, batch_size, max_sequences, limit = settings.tasks, settings.batch_size, settings.max_sequences, settings.limit
    # Cheap checks first (task names and files, tokenizer, dataset, checkpoint files), then the task items
    # (lm-eval datasets may download), and only then the model.
    resolved = resolve_tasks(tasks)
    tokenizer = load_tokenizer(model_dir)
    dd, data_config = load_packed(data_dir)
    check_matches(data_config, tokenizer, where=f"dataset {data_dir}")
    check_checkpoint_dir(model_dir)
    # Task items come from the whole split whatever max_sequences is, so runs with different caps stay comparable.
    for task in resolved:
        build_items(task, tokenizer, dd["validation"], limit)
    validation = dd["validation"].spread(max_sequences)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(model_dir, dtype=dtype, device=device)
    with _progress(model, math.ceil(len(validation) / batch_size), "validation loss"):
        loss = validation_loss(model, validation, batch_size)
    metrics = {
        "validation_loss": loss,
        "perplexity": _exp(loss),
        "validation_sequences": len(validation),
        "validation_tokens": int(validation[:, 1:].numel()),
        "parameters": parameter_count(model),
        "tasks": {task.name: score_task(task, model, tokenizer, batch_size, limit) for task in resolved},
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


# --------------------------------------------------------------------------------------------- task resolution


def resolve_tasks(names: tuple[str, ...] | list[str]) -> list[Task]:
    """Turn task names into `Task`s without touching any model: unknown names and bad files fail here."""
    if not names:
        raise EvaluationError("no tasks given (built-in tasks: " + ", ".join(BUILTIN_TASKS) + ")")
    resolved = []
    for raw in names:
        name, fewshot = _split_fewshot(raw)
        if name in BUILTIN_TASKS:
            task = Task(name, "builtin")
        elif name.endswith((".yaml", ".yml")) or os.sep in name or Path(name).is_file():
            task = _resolve_task_file(Path(name))
        else:
            task = _resolve_lm_eval_name(name)
        if fewshot is not None and task.kind != "lm-eval":
            raise EvaluationError(f"task {raw!r}: a few-shot count applies only to lm-eval tasks")
        task.num_fewshot = fewshot
        resolved.append(task)
    seen = set()
    for task in resolved:
        if task.name in seen:
            raise EvaluationError(f"task {task.name!r} is given twice")
        seen.add(task.name)
    return resolved


def _split_fewshot(raw: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+):(\d+)", raw)
    return (m.group(1), int(m.group(2))) if m else (raw, None)


class LocalTaskSpec(BaseModel):
    """The task YAML format (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    type: Literal["multiple_choice", "last_word"]
    jsonl: str
    context_field: str = "context"
    choices_field: str = "choices"
    answer_field: str = "answer"
    target_delimiter: str = " "


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
    try:
        local = LocalTaskSpec(**spec)
    except ValidationError as e:
        from secateurs.config import format_error

        raise EvaluationError(
            f"task file {path}: " + "; ".join(format_error(err) for err in e.errors())
        ) from None
    task = Task(local.name or path.stem, "local", type=local.type)
    task.items = _read_local_items(path, local)
    return task


def _read_local_items(path: Path, spec: LocalTaskSpec) -> list:
    data = path.parent / spec.jsonl
    if not data.is_file():
        raise EvaluationError(f"task file {path}: its items file {data} does not exist")
    items = []
    for lineno, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{data}:{lineno}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{where} is not JSON: {e}") from None
        context, answer = doc.get(spec.context_field), doc.get(spec.answer_field)
        if not isinstance(context, str):
            raise EvaluationError(f"{where}: field {spec.context_field!r} must be a string")
        if spec.type == "last_word":
            if not isinstance(answer, str) or not answer.strip():
                raise EvaluationError(
                    f"{where}: field {spec.answer_field!r} must be the non-empty target text"
                )
            items.append(LastWordItem(context, answer, spec.target_delimiter))
            continue
        choices = doc.get(spec.choices_field)
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise EvaluationError(
                f"{where}: field {spec.choices_field!r} must be a list of at least 2 non-empty strings"
            )
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise EvaluationError(
                f"{where}: field {spec.answer_field!r}={answer!r} must be a choice index 0..{len(choices) - 1}"
            )
        items.append(ChoiceItem(context, choices, answer, spec.target_delimiter))
    if not items:
        raise EvaluationError(f"task file {path}: {data} holds no items")
    return items


def _unknown(name: str, why: str) -> EvaluationError:
    return EvaluationError(
        f"unknown task {name!r}: built-in tasks: {', '.join(BUILTIN_TASKS)}; or a path to a task YAML; "
        f"or an lm-eval task name ({why})"
    )


def _resolve_lm_eval_name(name: str) -> Task:
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise _unknown(name, "lm-eval not installed: pip install 'secateurs[eval]'") from None
    manager = _lm_eval_registry()
    if name not in manager.all_tasks:
        raise _unknown(name, f"lm-eval {_lm_eval_version()} has none called {name!r}")
    if name in manager.all_tags:
        # A tag is a loose list of tasks with no aggregate score; one metrics entry per name needs a task or group.
        raise EvaluationError(f"lm-eval name {name!r} is a tag, not a task or group: name its tasks instead")
    _require_hub_for(name)
    return Task(name, "lm-eval", lm_eval_manager=manager)


def _resolve_lm_eval_file(path: Path, spec: dict) -> Task:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvaluationError(
            f"task file {path} is an lm-eval task, but lm-eval is not installed: pip install 'secateurs[eval]'"
        ) from None
    name = str(spec["task"])
    # Only the file's own directory: indexing lm-eval's ~15k bundled task files costs ~20 s of CPU.
    manager = TaskManager(include_defaults=False, include_path=str(path.parent.resolve()))
    if name not in manager.all_tasks:
        raise EvaluationError(f"lm-eval task file {path} does not define a usable task {name!r}")
    return Task(name, "lm-eval", lm_eval_manager=manager)


_REGISTRY = None


def _lm_eval_registry():
    # Building the index reads every bundled task YAML; do it once per process.
    global _REGISTRY
    if _REGISTRY is None:
        from lm_eval.tasks import TaskManager

        _REGISTRY = TaskManager()
    return _REGISTRY


def _lm_eval_version() -> str:
    import importlib.metadata as md

    return md.version("lm_eval")


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "0") not in ("0", "", "false", "False")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _require_hub_for(name: str) -> None:
    """Registry tasks download their datasets; fail now, naming the task, when that cannot work."""
    if _hub_offline():
        return  # offline mode: a cached dataset may serve; `_load_lm_eval_task` says so when it does not
    from secateurs.checkpoint import CheckpointError, _require_hub

    try:
        _require_hub(f"the dataset of lm-eval task {name!r}")
    except CheckpointError as e:
        raise EvaluationError(f"{e}; set HF_DATASETS_OFFLINE=1 to use a cached copy") from None


def _load_lm_eval_task(manager, name: str, where: str):
    """Load the task and its dataset (download or cache) now: lm-eval itself would do it after the model."""
    try:
        loaded = manager.load(name)
    except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many types; one line naming the task helps
        text = str(e).strip().splitlines()
        hint = (
            " (the hub is off: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, and no cached copy)"
            if _hub_offline()
            else ""
        )
        raise EvaluationError(
            f"{where}: cannot load its dataset{hint}: {type(e).__name__}: {text[0] if text else ''}"
        ) from None
    # A group (mmlu) comes back as itself plus everything under it; evaluate the group.
    return loaded["groups"].get(name) or loaded["tasks"][name]


# ------------------------------------------------------------------------------------------ item construction


def build_items(task: Task, tokenizer, validation, limit: int | None) -> None:
    """Tokenize the task's items (and build lambada-docs from the validation split) before the model loads.

    Args:
        validation: the dataset's validation split (a `secateurs.data.PackedSplit`).
    """
    if task.kind == "lm-eval":
        task.lm_eval_task = _load_lm_eval_task(task.lm_eval_manager, task.name, f"lm-eval task {task.name!r}")
        return
    if task.kind == "builtin":
        # Only the first LAMBADA_SOURCE_TOKENS tokens are read.
        ids = validation.head(max(1, LAMBADA_SOURCE_TOKENS // validation.seq_len))
        task.items = lambada_docs_items(ids, tokenizer, min(limit or LAMBADA_DOCS_ITEMS, LAMBADA_DOCS_ITEMS))
        if not task.items:
            raise EvaluationError(
                f"task {task.name}: the validation split holds no prose passage of {PASSAGE_CHARS[0]}-{PASSAGE_CHARS[1]} "
                "characters ending in a word; prepare the dataset with more validation text"
            )
        return
    task.items = task.items[:limit] if limit else task.items
    for item in task.items:
        if isinstance(item, LastWordItem):
            item.request = continuation_request(tokenizer, item.context, item.delimiter + item.target)
        else:
            item.requests = [
                continuation_request(tokenizer, item.context, item.delimiter + c) for c in item.choices
            ]


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, ids of context + continuation), with lm-eval's conventions.

    Trailing spaces of the context move to the continuation (BPE tokenizers attach a space to the next word). The
    tokenizer's own special tokens are kept (a Llama tokenizer adds BOS, a GPT-2 style one adds nothing). An empty
    context becomes BOS, or EOS when there is none, as in lm-eval.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + continuation)["input_ids"]
    if not context_ids:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        context_ids, whole = [prefix], [prefix] + whole
    return context_ids, whole


def continuation_request(tokenizer, context: str, continuation: str) -> Request:
    """The request scoring CONTINUATION after CONTEXT.

    The whole string is tokenized once and the context's token count cut off (lm-eval's split), so the
    continuation's tokens are the ones the model would see in running text: tokenizing it alone can merge
    differently at the boundary.
    """
    context_ids, whole = _encode_pair(tokenizer, context, continuation)
    if len(whole) <= len(context_ids):
        raise EvaluationError(
            f"continuation {continuation!r} of context {context[-40:]!r} has no tokens of its own"
        )
    return Request(context_ids, whole[len(context_ids) :])


def lambada_docs_items(
    validation: torch.Tensor, tokenizer, n: int = LAMBADA_DOCS_ITEMS
) -> list[LastWordItem]:
    """The built-in last-word task, rebuilt from a dataset's validation split.

    The packed sequences are concatenated, split into documents at EOS and decoded. Lines are stripped of
    indentation and box-drawing `|` (plain-text renderings such as pydoc indent prose that way); runs of
    consecutive prose lines (letters, digits, spaces and common punctuation only: code and signatures break a run)
    are joined into blocks. A passage is a run of whole sentences of one block, 100-200 characters long, ending
    in a word of at least 3 letters and a full stop; its context is everything before that word, its target the
    word. Duplicates are dropped, and n passages are taken evenly spaced over the candidates so a small n still
    samples all of the text.
    Passages whose context tokens are not a prefix of the passage's tokens are skipped (rare: a BPE merge across
    the boundary). Only the first LAMBADA_SOURCE_TOKENS validation tokens are read.

    Args:
        validation: [sequences, seq_len] token ids.
        tokenizer: the dataset's tokenizer.
        n: number of items wanted; fewer come back when the split has fewer passages.
    Returns:
        The items, in order of appearance; the same for every model sharing the tokenizer.
    """
    ids = validation.flatten()[:LAMBADA_SOURCE_TOKENS].tolist()
    eos = tokenizer.eos_token_id
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eos:
            docs.append(ids[start:i])
            start = i + 1
    docs.append(ids[start:])
    candidates, seen = [], set()
    for doc in docs:
        for passage in _passages(
            tokenizer.decode(doc, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ):
            if passage in seen:
                continue
            seen.add(passage)
            item = _last_word_item(passage, tokenizer)
            if item is not None:
                candidates.append(item)
    if len(candidates) <= n:
        return candidates
    return [candidates[k * len(candidates) // n] for k in range(n)]


_PROSE = re.compile(r"[^\W_]|[ ,.;:'\"()?!\-\u2019\u201c\u201d]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_LAST_WORD = re.compile(r" ([^\W\d_]{3,})\.$")


def _passages(text: str):
    """Candidate passages of one document, in order (see `lambada_docs_items`)."""
    lo, hi = PASSAGE_CHARS
    for block in _prose_blocks(text):
        sentences = _SENTENCE_END.split(block)
        i = 0
        while i < len(sentences):
            # Grow a window of sentences from i until it is long enough; take it if it fits and ends in a word.
            j, passage = i, sentences[i]
            while len(passage) < lo and j + 1 < len(sentences):
                j += 1
                passage += " " + sentences[j]
            if lo <= len(passage) <= hi and _LAST_WORD.search(passage):
                yield passage
                i = j + 1
            else:
                i += 1


def _prose_blocks(text: str):
    """Runs of consecutive prose lines (no blank line between), indentation and `|` stripped, joined by spaces."""
    block = []
    for line in text.splitlines() + [""]:
        line = re.sub(r"^[\s|]+", "", line).strip()
        if line and all(_PROSE.match(ch) for ch in line):
            block.append(line)
        elif block:
            yield re.sub(r"\s+", " ", " ".join(block))
            block = []


def _last_word_item(passage: str, tokenizer) -> LastWordItem | None:
    word = _LAST_WORD.search(passage).group(1)
    context = passage[: -len(word) - 2]  # drop " word."
    context_ids, whole = _encode_pair(tokenizer, context, " " + word)
    if whole[: len(context_ids)] != context_ids:
        return None
    return LastWordItem(context, word, " ", Request(context_ids, whole[len(context_ids) :]))


# -------------------------------------------------------------------------------------------------- scoring


def score_task(task: Task, model, tokenizer, batch_size: int, limit: int | None) -> dict:
    """The task's metrics plus `n`, the number of items scored."""
    if task.kind == "lm-eval":
        return _score_lm_eval(task, model, tokenizer, batch_size, limit)
    if task.type == "multiple_choice":
        requests = [r for item in task.items for r in item.requests]
    else:
        requests = [item.request for item in task.items]
    with _progress(model, math.ceil(len(requests) / batch_size), task.name):
        scores = score_requests(model, requests, batch_size)
    if task.type == "multiple_choice":
        return multiple_choice_metrics(task.items, scores)
    return last_word_metrics(scores)


@torch.inference_mode()
def score_requests(model, requests: list[Request], batch_size: int = 8) -> list[tuple[float, bool]]:
    """Log-likelihood of every continuation given its context, and whether greedy decoding reproduces it.

    Sequences are right-padded to the longest of the batch and the attention mask hides the padding; a batch with
    nothing to pad (batch_size=1) runs exactly like a plain `model(input_ids)` call.

    Returns:
        Per request, (sum over continuation tokens of log p(token | prefix) in nats, all argmax == token).
    """
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        # The last continuation token is never needed as an input, but feeding the whole sequence keeps a single
        # request's forward pass identical to the plain computation (same shapes, same kernels).
        inputs = [r.context + r.continuation for r in batch]
        width = max(len(x) for x in inputs)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, x in enumerate(inputs):
            input_ids[b, : len(x)] = torch.tensor(x)
            attention_mask[b, : len(x)] = 1
        padded = any(len(x) < width for x in inputs)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device) if padded else None,
            use_cache=False,
        ).logits
        for b, r in enumerate(batch):
            # logits [batch, width, vocab]; positions c-1 .. c+t-2 predict the t continuation tokens.
            c, t = len(r.context), len(r.continuation)
            rows = logits[b, c - 1 : c - 1 + t].float()
            target = torch.tensor(r.continuation, device=rows.device)
            logprobs = torch.log_softmax(rows, dim=-1).gather(1, target[:, None])[:, 0]
            results.append((logprobs.double().sum().item(), bool((rows.argmax(-1) == target).all())))
    return results


def last_word_metrics(scores: list[tuple[float, bool]]) -> dict:
    ll = [s for s, _ in scores]
    mean_ll = sum(ll) / len(ll)
    return {
        "acc": sum(greedy for _, greedy in scores) / len(scores),
        "log_likelihood": mean_ll,
        "perplexity": _exp(-mean_ll),
        "n": len(scores),
    }


def multiple_choice_metrics(items: list[ChoiceItem], scores: list[tuple[float, bool]]) -> dict:
    """acc and acc_norm as lm-eval computes them (acc_norm divides by the choice's length in characters)."""
    acc = acc_norm = 0
    k = 0
    for item in items:
        ll = [s for s, _ in scores[k : k + len(item.choices)]]
        k += len(item.choices)
        # lm-eval measures the choice without the delimiter it prepends.
        norm = [s / len(c) for s, c in zip(ll, item.choices)]
        acc += int(max(range(len(ll)), key=ll.__getitem__) == item.answer)
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.answer)
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def _score_lm_eval(task: Task, model, tokenizer, batch_size: int, limit: int | None) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
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
        metric, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric:
            metrics[metric if filt in ("", "none") else f"{metric}_{filt}"] = value
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


@contextmanager
def _progress(model, total: int, desc: str):
    """A progress bar that advances on every forward pass of MODEL, so library loops report without change."""
    bar = tqdm(total=total, desc=desc, unit="batch")

    def advance(module, args):
        bar.update()  # returns a bool; a pre-hook must return None or it replaces the forward's arguments

    handle = model.register_forward_pre_hook(advance)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


__all__ = [
    "BUILTIN_TASKS",
    "EvaluationError",
    "lambada_docs_items",
    "read_metrics",
    "resolve_tasks",
    "run",
    "score_requests",
]
