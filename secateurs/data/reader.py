"""Reading a prepared dataset: its shards memory-mapped, checked by size and sha256, a split as a map-style dataset
over the blend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from secateurs.data.blend import blend_index
from secateurs.data.format import FORMAT, INDEX, SPLITS, DataError, tokenizer_identity
from secateurs.data.sources import _localized
from secateurs.manifest import read_manifest

if TYPE_CHECKING:
    import torch


def _shards(index: dict) -> Iterator[dict]:
    """Every shard an index lists."""
    for source in index["sources"]:
        for split in SPLITS:
            yield from source["shards"][split]


def _shard_bytes(index: dict, shard: dict) -> int:
    return shard["sequences"] * index["seq_len"] * np.dtype(index["dtype"]).itemsize


def shard_root(path: Path, index: dict) -> Path:
    """The local directory that holds the shards of the dataset at PATH (whose index is INDEX): PATH itself, or
    the store its index names as `location`: a directory (a shared volume), read in place, or an `s3://` prefix,
    fetched into the cache (only what this machine lacks, one process at a time; the readers check each shard's
    sha256 before using it).

    Raises:
        DataError: the location is a directory this machine does not have.
    """
    location = index.get("location")
    if location is None:
        return path
    if location.startswith("s3://"):
        from secateurs import storage
        from secateurs.files import cache_dir

        return storage.localize(location, cache_dir())
    if not Path(location).is_dir():
        raise DataError(f"dataset {path} keeps its shards in {location}, which this machine does not have: mount "
                        f"the volume that holds it (placement.cache_volume), or prepare the data again")  # fmt: skip
    return Path(location)


def _verify_shard(root: Path, shard: dict) -> None:
    with open(root / shard["file"], "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    if sha256 != shard["sha256"]:
        raise DataError(f"shard {root / shard['file']} was altered after preparation: its sha256 is {sha256[:16]}, "
                        f"the index says {shard['sha256'][:16]}")  # fmt: skip


class PackedSplit:
    """One split of a prepared dataset: `len()` sequences, item i = {"input_ids": LongTensor[seq_len]}.

    A map-style dataset (what the Trainer's samplers shuffle and shard over processes) over memory-mapped shards;
    nothing is read until an item is asked for.
    """

    def __init__(self, root: Path, index: dict, split: str):
        self.root, self.split = root, split
        self.seq_len, self.dtype = index["seq_len"], np.dtype(index["dtype"])
        self._shards = [source["shards"][split] for source in index["sources"]]
        for shards in self._shards:
            for shard in shards:
                path = root / shard["file"]
                expected = _shard_bytes(index, shard)
                size = path.stat().st_size if path.is_file() else None
                if size != expected:
                    what = "is missing" if size is None else f"holds {size} bytes, expected {expected}"
                    raise DataError(f"shard {path} {what}: the dataset is truncated or damaged; prepare it again")
        self._starts = [np.cumsum([0] + [s["sequences"] for s in shards]) for shards in self._shards]
        counts = [int(starts[-1]) for starts in self._starts]
        self.source_of, self.sample_of = blend_index(counts, [s["weight"] for s in index["sources"]], index["seed"])
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        self._checked = False  # every shard's sha256 checked by `verify` (by this process or its peers)

    def __len__(self) -> int:
        return len(self.source_of)

    def _sequence(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of a split of {len(self)}")
        k, j = int(self.source_of[i]), int(self.sample_of[i])
        s = int(np.searchsorted(self._starts[k], j, side="right")) - 1
        mapped = self._maps.get((k, s))
        if mapped is None:
            shard = self._shards[k][s]
            if not self._checked:  # once per shard and process, before its first sequence is used
                _verify_shard(self.root, shard)
            mapped = np.memmap(self.root / shard["file"], dtype=self.dtype, mode="r").reshape(-1, self.seq_len)
            self._maps[(k, s)] = mapped
        return mapped[j - int(self._starts[k][s])]

    def __getitem__(self, i: int) -> dict:
        import torch

        return {"input_ids": torch.from_numpy(self._sequence(int(i)).astype(np.int64))}

    def sequences(self, indices) -> torch.Tensor:
        """The sequences at INDICES as one [n, seq_len] LongTensor."""
        import torch

        rows = [self._sequence(int(i)).astype(np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, self.seq_len), np.int64))

    def head(self, n: int | None) -> torch.Tensor:
        """The first N sequences (all for None)."""
        return self.sequences(range(len(self) if n is None else min(n, len(self))))

    def spread(self, n: int | None) -> torch.Tensor:
        """N sequences spread evenly over the split (all of them for None or N >= its length).

        Documents are packed in order, so the first N sequences of a split are its first one or two documents (a
        python-docs document, one module's documentation, is ~4,300 tokens on average); an even spread reads all
        of them.
        """
        if n is None or n >= len(self):
            return self.head(None)
        return self.sequences(i * len(self) // n for i in range(n))

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Check the sha256 of every shard of the split before it is read, process RANK of WORLD checking every
        WORLD-th one: a training run reads each byte once more, not once per process. A process whose share fails
        raises, and torchrun stops its peers at their first collective, before a first step completes."""
        shards = [shard for shards in self._shards for shard in shards]
        for shard in shards[rank::world]:
            _verify_shard(self.root, shard)
        self._checked = True


class PackedDataset(dict):
    """A prepared dataset: {"train": PackedSplit, "validation": PackedSplit}, `config` its manifest's config,
    `path` its artifact directory and `root` the directory its shards are read from (`shard_root`)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        manifest = read_manifest(path)
        if not path.is_dir() or manifest.get("step") != "prepare-data":
            raise DataError(f"{path} is not a dataset made by `secateurs prepare-data`")
        if not (path / INDEX).is_file():
            raise DataError(f"dataset {path} was made by an older secateurs (Arrow files, no {INDEX}): prepare it again")
        index = json.loads((path / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise DataError(f"dataset {path} has format {index.get('format')!r}, this secateurs reads {FORMAT!r}")
        root = shard_root(path, index)
        super().__init__({split: PackedSplit(root, index, split) for split in SPLITS})
        for split in SPLITS:
            if len(self[split]) == 0:
                raise DataError(f"dataset {path} has an empty {split} split")
        self.path, self.root, self.index, self.config = path, root, index, manifest["config"]


def load_packed(path: str | Path) -> tuple[PackedDataset, dict]:
    """Open a prepared dataset (a local directory or an `s3://` prefix, holding its shards or a reference to where
    they are: `shard_root`); returns it and its manifest config."""
    dataset = PackedDataset(_localized(str(path)))
    return dataset, dataset.config


def check_matches(data_config: dict, tokenizer, seq_len: int | None = None, where: str = "dataset") -> None:
    """Refuse a dataset made with another tokenizer (or another sequence length when one is required)."""
    ident = tokenizer_identity(tokenizer)
    if data_config.get("tokenizer") != ident:
        raise DataError(
            f"{where} was tokenized with tokenizer {data_config.get('tokenizer')}, but the model's tokenizer is {ident}"
        )
    if seq_len is not None and data_config.get("seq_len") != seq_len:
        raise DataError(f"{where} has seq_len={data_config.get('seq_len')}, expected {seq_len}")
