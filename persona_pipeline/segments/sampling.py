"""Bounded samples of a fleet for the steps that must see it whole. Pure."""

from __future__ import annotations

import numpy as np


def stratified_sample(segments: np.ndarray, size: int, seed: int, minimum: int = 1_000) -> np.ndarray:
    """Sorted positions of about `size` devices: each segment in proportion to its share of the
    fleet but at least `minimum` of it (or a twentieth of `size`, if less; all of a smaller
    segment), drawn with `seed`. Every position when the fleet holds at most `size` devices."""
    devices = len(segments)
    if devices <= size:
        return np.arange(devices)
    _, group, counts = np.unique(segments, return_inverse=True, return_counts=True)
    floor = min(minimum, size // 20)
    quota = np.minimum(counts, np.maximum(counts * size // devices, floor))
    order = np.lexsort((np.random.default_rng(seed).random(devices), group))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    place = np.empty(devices, dtype=np.int64)
    place[order] = np.arange(devices) - np.repeat(starts, counts)
    return np.flatnonzero(place < quota[group])
