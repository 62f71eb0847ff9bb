"""What bench/mutation.py found no test for in the data reader: the item a split hands the Trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
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


def _largest_remainder(counts, weights):
    """The blend's rule worked in exact fractions: each source with sequences gets its weight's share of the
    total, floored, and the leftover sequences go one each by largest remainder, ties to the earlier source."""
    from fractions import Fraction

    w = [Fraction(x) if n > 0 else Fraction(0) for n, x in zip(counts, weights)]
    total = sum(counts)
    if sum(w) == 0:
        return [0] * len(counts)
    quota = [x / sum(w) * total for x in w]
    draws = [q.numerator // q.denominator for q in quota]
    for k in sorted(range(len(counts)), key=lambda k: (-(quota[k] - draws[k]), k))[: total - sum(draws)]:
        draws[k] += 1
    return draws


@pytest.mark.parametrize(
    "counts, weights, expected",
    [
        ([2, 1], [1.0, 1.0], [2, 1]),  # quotas 1.5 and 1.5: the leftover one to the first
        ([1, 3], [1.0, 1.0], [2, 2]),  # a source of one sequence still has its share
        ([0, 5, 3], [4.0, 1.0, 1.0], [0, 4, 4]),  # an empty source's weight counts for nothing
        ([4, 0], [0.0, 1.0], [0, 0]),  # no weight where there are sequences: nothing drawn
    ],
)
def test_blend_counts_hand_worked(counts, weights, expected):
    from secateurs.data.blend import blend_counts

    draws = blend_counts(counts, weights)
    assert draws.tolist() == expected == _largest_remainder(counts, weights)
    assert draws.dtype == np.int64


def test_blend_counts_breaks_remainder_ties_by_source_order():
    """40 sources, weights 1, 2, 1, 2, ...: quotas 1.25 and 2.5, so 15 leftover sequences for 20 tied remainders
    of 0.5. They go to the first 15 weight-2 sources; numpy's default (unstable) argsort picks others."""
    from secateurs.data.blend import blend_counts

    counts, weights = [2] * 35 + [1] * 5, [1.0, 2.0] * 20
    draws = blend_counts(counts, weights).tolist()
    assert draws == _largest_remainder(counts, weights)
    assert [k for k in range(40) if draws[k] == 3] == list(range(1, 30, 2))
    assert sum(draws) == sum(counts)


def test_blend_index_of_an_empty_blend_is_empty_and_typed():
    """No source drawn: no positions, in the dtypes the reader indexes with."""
    from secateurs.data.blend import blend_index

    source_of, sample_of = blend_index([0, 0], [1.0, 1.0], seed=0)
    assert source_of.shape == sample_of.shape == (0,)
    assert (source_of.dtype, sample_of.dtype) == (np.int32, np.int64)


def test_check_matches_refuses_another_sequence_length(tiny_data, tokenizer_dir):
    """A step that needs a sequence length (given as `seq_len`) gets the dataset's own checked: tiny_data was
    packed at 32 tokens."""
    from secateurs.checkpoint import load_tokenizer
    from secateurs.data import DataError, check_matches

    _, data_config = load_packed(tiny_data)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_matches(data_config, tokenizer, seq_len=32, where="dataset x")
    with pytest.raises(DataError) as refused:
        check_matches(data_config, tokenizer, seq_len=64, where="dataset x")
    assert str(refused.value) == "dataset x has seq_len=32, expected 64"
