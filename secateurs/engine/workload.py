"""What an engine and its benchmark share: the artifact's names, the lengths a benchmark asks for, its synthetic prompts,
the figures it reports and the hardware they were measured on.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENGINE_STEP = "build-engine"


BENCH_FILE = "bench.json"


DEFAULT_LENGTHS: tuple[tuple[int, int], ...] = ((128, 128), (2048, 128))


# The families secateurs prunes; both backends convert each of them.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class BackendUnavailable(RuntimeError):
    """The backend's runtime is not installed on this machine (a reason to skip, not a bad input)."""


def parse_lengths(spec: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`"128:128,2048:128"` -> `[(128, 128), (2048, 128)]` (input tokens, output tokens)."""
    if not isinstance(spec, str):
        pairs = [(int(i), int(o)) for i, o in spec]
    else:
        pairs = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"length pair {item!r} is not INPUT:OUTPUT (e.g. 128:128)")
            pairs.append((int(parts[0]), int(parts[1])))
    if not pairs:
        raise ValueError(f"no length pairs in {spec!r}; expected e.g. 128:128,2048:128")
    for i, o in pairs:
        if i < 1 or o < 1:
            raise ValueError(f"length pair {i}:{o} must have at least one input and one output token")
    return pairs


def check_lengths(lengths: Sequence[tuple[int, int]], context: int) -> None:
    """Refuse length pairs whose prompt + generation does not fit the model's context window."""
    for i, o in lengths:
        if i + o > context:
            raise ValueError(
                f"length pair {i}:{o} needs {i + o} positions but the model's context "
                f"(max_position_embeddings) is {context}"
            )


def synthetic_prompts(
    tokenizer_dir: str | Path, vocab_size: int, num: int, length: int, seed: int
) -> np.ndarray:
    """Random prompts of exactly `length` tokens drawn from the tokenizer's vocabulary.

    Special tokens (BOS/EOS/PAD, chat markers) are excluded so no prompt ends early or changes the chat state,
    the same rule `trtllm-bench prepare-dataset` applies to EOS.

    Returns:
        int32 array [num, length].
    """
    tokenizer_size, special_ids = _tokenizer_vocabulary(
        str(Path(tokenizer_dir).absolute()), _tokenizer_stamp(Path(tokenizer_dir))
    )
    # The model's embedding may be padded beyond the tokenizer; padded rows are not tokens.
    high = min(tokenizer_size, vocab_size)
    allowed = np.setdiff1d(np.arange(high), np.asarray(special_ids, dtype=np.int64))
    rng = np.random.default_rng(seed)
    return allowed[rng.integers(0, len(allowed), size=(num, length))].astype(np.int32)


def _tokenizer_stamp(tokenizer_dir: Path) -> tuple[float, ...]:
    return tuple(f.stat().st_mtime for f in sorted(tokenizer_dir.glob("tokenizer*")))


@functools.lru_cache(maxsize=8)
def _tokenizer_vocabulary(tokenizer_dir: str, stamp: tuple[float, ...]) -> tuple[int, tuple[int, ...]]:
    """(vocabulary size, special token ids); cached because loading a 150k-token tokenizer takes seconds.
    `stamp` (the tokenizer files' mtimes) makes a rewritten tokenizer a new cache key."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return len(tokenizer), tuple(tokenizer.all_special_ids)


def summarize_runs(seconds: Sequence[float], requests: int, output_tokens: int) -> dict[str, Any]:
    """Median and spread of requests/s and output tokens/s over timed repeats of the same work."""

    def spread(values: list[float]) -> dict[str, float]:
        med = statistics.median(values)
        return {
            "median": med,
            "min": min(values),
            "max": max(values),
            "rel_spread": (max(values) - min(values)) / med if med else 0.0,
        }

    return {
        "requests_per_s": spread([requests / s for s in seconds]),
        "output_tokens_per_s": spread([output_tokens / s for s in seconds]),
        "seconds": list(seconds),
    }


def _model_config(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "config.json"
    if not f.is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    return json.loads(f.read_text())


def detect_gpu_capability() -> tuple[int, int] | None:
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
