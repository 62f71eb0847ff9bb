"""secateurs' own offline tasks, written as lm-eval task YAMLs so that lm-eval scores them like any other task.

Two kinds of task are defined here rather than in lm-eval's registry:
- `lambada-docs`: LAMBADA-style last-word prediction on passages of a dataset's validation split
  (`lambada_docs_items`);
- a local task file (`LocalTaskSpec`, keys below), whose items are a JSONL file beside it:

      name: capitals          # key in metrics.json (default: the file name without .yaml)
      type: multiple_choice   # or last_word
      jsonl: capitals.jsonl   # one JSON object per line, path relative to the YAML
      context_field: context  # default "context"
      choices_field: choices  # multiple_choice only; default "choices": a list of strings
      answer_field: answer    # multiple_choice: index of the right choice; last_word: the target text
      target_delimiter: " "   # between context and continuation (lm-eval's default)

Items are checked here, each bad line failing in one line before any model loads, then written by `write_task`
as a JSONL of plain fields (`context`, `continuation` or `choices` + `answer`) with a task YAML over it
(`dataset_path: json`): `loglikelihood` for last_word, `multiple_choice` for multiple_choice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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


class LocalTaskSpec(BaseModel):
    """The local task file format (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    type: Literal["multiple_choice", "last_word"]
    jsonl: str
    context_field: str = "context"
    choices_field: str = "choices"
    answer_field: str = "answer"
    target_delimiter: str = " "


def read_task_file(path: Path, spec: dict) -> tuple[LocalTaskSpec, list[dict]]:
    """The task file's settings and its items as plain docs: {context, target} or {context, choices, answer}."""
    try:
        local = LocalTaskSpec(**spec)
    except ValidationError as e:
        from secateurs.config import format_error

        raise EvaluationError(f"task file {path}: " + "; ".join(format_error(err) for err in e.errors())) from None
    data = path.parent / local.jsonl
    if not data.is_file():
        raise EvaluationError(f"task file {path}: its items file {data} does not exist")
    docs = []
    for lineno, line in enumerate(data.read_text().splitlines(), 1):
        if line.strip():
            docs.append(_read_item(line, f"{data}:{lineno}", local))
    if not docs:
        raise EvaluationError(f"task file {path}: {data} holds no items")
    return local, docs


def _read_item(line: str, where: str, spec: LocalTaskSpec) -> dict:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{where} is not JSON: {e}") from None
    context, answer = doc.get(spec.context_field), doc.get(spec.answer_field)
    if not isinstance(context, str):
        raise EvaluationError(f"{where}: field {spec.context_field!r} must be a string")
    if spec.type == "last_word":
        if not isinstance(answer, str) or not answer.strip():
            raise EvaluationError(f"{where}: field {spec.answer_field!r} must be the non-empty target text")
        return {"context": context, "target": answer}
    choices = doc.get(spec.choices_field)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvaluationError(f"{where}: field {spec.choices_field!r} must be a list of at least 2 non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise EvaluationError(
            f"{where}: field {spec.answer_field!r}={answer!r} must be a choice index 0..{len(choices) - 1}"
        )
    return {"context": context, "choices": choices, "answer": answer}


def write_task(
    stem: Path,
    name: str,
    type: Literal["last_word", "multiple_choice"],
    docs: list[dict],
    target_delimiter: str = " ",
) -> None:
    """Write task NAME (its docs as `read_task_file` returns them) as the lm-eval task file STEM.yaml over the items
    in STEM.jsonl (a task name may hold any character, so it names no file)."""
    data = stem.with_suffix(".jsonl")
    task = {
        "task": name,
        "dataset_path": "json",
        # The datasets cache of the items stays beside them: nothing else is written, and it goes with them.
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(stem.with_suffix(".cache"))},
        "test_split": "test",
        "doc_to_text": "context",
        "target_delimiter": target_delimiter,
        "metadata": {"version": 1.0},
    }
    if type == "last_word":
        # A loglikelihood request scores exactly doc_to_target after the context, so the delimiter goes in front.
        docs = [{"context": d["context"], "continuation": target_delimiter + d["target"]} for d in docs]
        task |= {"output_type": "loglikelihood", "doc_to_target": "continuation"}
        # lm-eval's per-item value of `perplexity` is the log-likelihood: averaged here ("mean"), not exponentiated,
        # so the mean log-likelihood comes back as it is (and a broken model's huge losses cannot overflow).
        metrics = ("perplexity", "acc")
    else:
        task |= {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "answer"}
        metrics = ("acc", "acc_norm")
    task["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    stem.with_suffix(".yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def lambada_docs_items(validation: torch.Tensor, tokenizer, n: int = LAMBADA_DOCS_ITEMS) -> list[dict]:
    """The built-in last-word task, rebuilt from a dataset's validation split: items {context, target}.

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
        for passage in _passages(tokenizer.decode(doc, skip_special_tokens=True, clean_up_tokenization_spaces=False)):
            if passage in seen:
                continue
            seen.add(passage)
            word = _LAST_WORD.search(passage).group(1)
            context = passage[: -len(word) - 2]  # drop " word."
            if _splits_cleanly(tokenizer, context, " " + word):
                candidates.append({"context": context, "target": word})
    if len(candidates) <= n:
        return candidates
    return [candidates[k * len(candidates) // n] for k in range(n)]


def _splits_cleanly(tokenizer, context: str, continuation: str) -> bool:
    """Whether the tokens of CONTEXT are a prefix of those of CONTEXT + CONTINUATION. lm-eval cuts the whole
    string's tokens at the context's token count; where a BPE merge crosses the boundary, that cut would score
    a piece of the context as the target."""
    context_ids = tokenizer(context)["input_ids"]
    return tokenizer(context + continuation)["input_ids"][: len(context_ids)] == context_ids


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
