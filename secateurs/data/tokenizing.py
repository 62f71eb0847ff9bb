"""Documents to token ids, in batches, in this process or in a pool of worker processes."""

from __future__ import annotations

import collections
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    from secateurs.checkpoint import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode(_WORKER_TOKENIZER, texts)


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of TEXTS, each followed by EOS, as one flat array and the documents' lengths."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        for doc in ids:
            doc.append(tokenizer.eos_token_id)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths


def _encoded(batches: Iterator[tuple[int, list[str]]], tokenizer, tokenizer_dir: Path, num_proc: int):
    """(documents consumed, texts, flat ids, lengths) per batch, in order.

    With several processes at most two batches per process are in flight: a process pool's `map` would read the
    whole stream ahead, which is what bounded memory forbids (hence the hand-kept window).
    """
    if num_proc == 1:
        for consumed, texts in batches:
            yield consumed, texts, *encode(tokenizer, texts)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork, as `datasets`' own map does: workers start in milliseconds instead of importing transformers again
    # (seconds). The parent has not tokenized anything, so no tokenizer thread pool is copied mid-state.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                             initargs=(str(tokenizer_dir),)) as pool:  # fmt: skip
        window: collections.deque = collections.deque()
        try:
            for consumed, texts in batches:
                window.append((consumed, texts, pool.submit(_encode_in_worker, texts)))
                if len(window) >= 2 * num_proc:
                    consumed, texts, done = window.popleft()
                    yield consumed, texts, *done.result()
            while window:
                consumed, texts, done = window.popleft()
                yield consumed, texts, *done.result()
        finally:
            for *_, pending in window:
                pending.cancel()
