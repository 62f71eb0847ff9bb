"""The shard writer: packed sequences of one split into shard files of raw token ids, resumable after its last
finished shard.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


class _SplitWriter:
    """Packs one split of one source into shards of `shard_sequences` sequences.

    Sequences are appended to `<prefix>-NNNNN.bin.partial`, renamed without `.partial` once the shard is full (or
    the source ends). `state()` is what a restart needs: the finished shards, the length of the open one and the
    tokens (fewer than one sequence) still waiting for the next document.
    """

    def __init__(self, root: Path, prefix: str, seq_len: int, dtype: np.dtype, shard_sequences: int,
                 cap: int | None, state: dict | None = None):  # fmt: skip
        self.root, self.prefix, self.seq_len, self.dtype = root, prefix, seq_len, dtype
        self.shard_sequences, self.cap = shard_sequences, cap
        state = state or {"shards": [], "open_sequences": 0, "pending": [], "tokens": 0}
        self.shards: list[dict] = state["shards"]
        self.open_sequences: int = state["open_sequences"]
        self.pending = np.asarray(state["pending"], dtype=dtype)
        self.tokens: int = state["tokens"]  # tokens of the documents given, for the validation rule
        self._file = None
        # A killed run may have written past its last recorded state: finished the open shard, started more.
        current = len(self.shards)
        for path in root.glob(f"{prefix}-*.bin*"):
            if int(path.name.rsplit("-", 1)[1].split(".")[0]) > current:
                path.unlink()
        partial = self._path(current, partial=True)
        if self._path(current).exists():
            os.replace(self._path(current), partial)
        if partial.exists():
            os.truncate(partial, self.open_sequences * seq_len * dtype.itemsize)

    def _path(self, i: int, partial: bool = False) -> Path:
        return self.root / f"{self.prefix}-{i:05d}.bin{'.partial' if partial else ''}"

    @property
    def sequences(self) -> int:
        return sum(s["sequences"] for s in self.shards) + self.open_sequences

    @property
    def full(self) -> bool:
        """No more documents wanted: the tokens given already fill the cap."""
        return self.cap is not None and self.tokens >= self.cap * self.seq_len

    def add(self, tokens: np.ndarray) -> bool:
        """Append TOKENS (whole documents); True when a shard was finished."""
        self.tokens += len(tokens)
        buffer = np.concatenate([self.pending, tokens.astype(self.dtype)])
        n = len(buffer) // self.seq_len
        if self.cap is not None:
            n = min(n, self.cap - self.sequences)
        self.pending = buffer[n * self.seq_len :] if not self.full else buffer[:0]
        sequences, finished = buffer[: n * self.seq_len], False
        while len(sequences):
            take = min(self.shard_sequences - self.open_sequences, len(sequences) // self.seq_len)
            if self._file is None:
                self.root.joinpath(self.prefix).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self._path(len(self.shards), partial=True), "ab")  # noqa: SIM115 (open across calls)
            self._file.write(sequences[: take * self.seq_len].tobytes())
            self.open_sequences += take
            sequences = sequences[take * self.seq_len :]
            if self.open_sequences == self.shard_sequences:
                self._finish_shard()
                finished = True
        return finished

    def _finish_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        partial, final = self._path(len(self.shards), partial=True), self._path(len(self.shards))
        os.replace(partial, final)
        with open(final, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        self.shards.append({"file": final.relative_to(self.root).as_posix(), "sequences": self.open_sequences,
                            "sha256": sha256})  # fmt: skip
        self.open_sequences = 0

    def state(self) -> dict:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": self.shards, "open_sequences": self.open_sequences, "pending": self.pending.tolist(),
                "tokens": self.tokens}  # fmt: skip

    def close(self) -> list[dict]:
        """Finish the open shard (the tokens short of a sequence are dropped) and return the shards."""
        if self.open_sequences:
            self._finish_shard()
        return self.shards
