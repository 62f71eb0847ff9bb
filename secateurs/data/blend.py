"""Blend arithmetic: each source's share of a split's sequences, interleaved evenly."""

from __future__ import annotations

import numpy as np


def blend_counts(counts: list[int], weights: list[float]) -> np.ndarray:
    """Sequences drawn from each source for a split of `sum(counts)` sequences: shares proportional to the
    weights of the sources that have sequences, rounded by largest remainder so they sum exactly."""
    counts_a = np.asarray(counts, dtype=np.int64)
    w = np.where(counts_a > 0, np.asarray(weights, dtype=np.float64), 0.0)
    total = int(counts_a.sum())
    if w.sum() <= 0:
        return np.zeros_like(counts_a)
    quota = w / w.sum() * total
    draws = np.floor(quota).astype(np.int64)
    for k in np.argsort(-(quota - draws), kind="stable")[: total - int(draws.sum())]:
        draws[k] += 1
    return draws


def blend_index(counts: list[int], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position of a blended split, the source and the sequence within it.

    Each source's draws are spread evenly over the split (its j-th draw at (j + 1/2) / draws), so any stretch of
    it holds the sources in proportion. A source used whole is read in order; one drawn more or fewer times than
    it has sequences takes a fresh seeded permutation of them per pass.
    """
    draws = blend_counts(counts, weights)
    times = np.concatenate([(np.arange(d) + 0.5) / d for d in draws if d] or [np.zeros(0)])
    sources = np.concatenate([np.full(d, k, dtype=np.int32) for k, d in enumerate(draws) if d] or [np.zeros(0, np.int32)])
    order = np.lexsort((sources, times))
    source_of = sources[order]
    sample_of = np.empty(len(source_of), dtype=np.int64)
    for k, (d, n) in enumerate(zip(draws, counts)):
        if not d:
            continue
        if d == n:
            picks = np.arange(n)
        else:
            passes = -(-d // n)
            picks = np.concatenate([np.random.default_rng([seed, k, p]).permutation(n) for p in range(passes)])[:d]
        sample_of[source_of == k] = picks
    return source_of, sample_of
