"""The prepared dataset's format: its file names and splits, the error a dataset or source that cannot be used
raises, the token width of the shards and the tokenizer identity they record.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

SPLITS = ("train", "validation")


FORMAT = "secateurs-tokens/1"


INDEX = "index.json"


class DataError(ValueError):
    """A data source or dataset artifact that cannot be used."""


def tokenizer_identity(tokenizer) -> str:
    """A hash of the vocabulary and special tokens: equal for the same tokenizer saved anywhere."""
    vocab = tokenizer.get_vocab()
    ident = {"vocab": sorted(vocab.items()), "eos": tokenizer.eos_token, "bos": tokenizer.bos_token}
    # Not `manifest.json_digest`: that sorts the keys, and every dataset already written records this hash of the
    # keys in this order; a tokenizer would then no longer match the datasets prepared with it.
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def token_dtype(tokenizer) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of TOKENIZER."""
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
