"""What bench/mutation.py found no test for in the data reader: the item a split hands the Trainer."""

from __future__ import annotations

import json

import numpy as np
import torch

from secateurs.data import load_packed


def test_a_split_item_is_the_trainers_input_ids_row_of_its_shard(tiny_data):
    """The Trainer's collator reads the key `input_ids`; its value is the shard's row as int64, read here from
    the index and the shard bytes directly (one source, so item i is row i)."""
    dataset, _ = load_packed(tiny_data)
    index = json.loads((tiny_data / "index.json").read_text())
    (source,) = index["sources"]
    for split in ("train", "validation"):
        (shard,) = source["shards"][split]
        rows = np.fromfile(tiny_data / shard["file"], dtype=index["dtype"]).reshape(-1, index["seq_len"])
        assert len(dataset[split]) == len(rows) == shard["sequences"]
        for i in (0, len(rows) - 1, -1):
            item = dataset[split][i]
            assert item.keys() == {"input_ids"} and item["input_ids"].dtype == torch.int64
            assert item["input_ids"].tolist() == rows[i].astype(np.int64).tolist()
