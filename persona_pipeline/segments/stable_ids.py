"""Stable segment ids across runs: today's segments matched to yesterday's. Pure.

Yesterday's segments are measured in today's space (the mean of today's vectors of
the devices that were in each segment), so matching works when vectors or weights
changed in between. Matching is a minimum-cost assignment on centre distances; a
pair is accepted only when yesterday's centre lies within today's segment's
typical radius, otherwise today's segment is new and gets a new id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from persona_pipeline.segments.clustering import NOISE, segment_centres

UNKNOWN = -2  # a device without a previous segment (new, or never clustered)


@dataclass
class PreviousSegments:
    ids: np.ndarray  # the previous segment ids that still have devices
    centres: np.ndarray  # their centres in today's space


def previous_segments(matrix: np.ndarray, previous_ids: np.ndarray) -> PreviousSegments:
    """Centres, in today's space, of the previous segments (`previous_ids` aligned with rows)."""
    known = previous_ids >= 0
    ids, dense = np.unique(previous_ids[known], return_inverse=True)
    labels = np.full(len(previous_ids), NOISE, dtype=np.int64)
    labels[known] = dense
    return PreviousSegments(ids=ids, centres=segment_centres(matrix, labels))


@dataclass
class Matching:
    ids: np.ndarray  # stable id per fitted label 0..m-1
    matched: int
    new: int
    retired: list[int]


def match_segment_ids(
    matrix: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    previous: PreviousSegments,
    next_id: int,
    match_radius: float = 1.0,
) -> Matching:
    """A stable id for each fitted label: a previous segment's id when matched, else a new
    id from `next_id` upwards (larger segments first)."""
    count = len(centres)
    ids = np.full(count, -1, dtype=np.int64)
    if count and len(previous.ids):
        cost = cdist(centres, previous.centres)
        rows, cols = linear_sum_assignment(cost)
        radius = _median_radius(matrix, labels, centres)
        accepted = cost[rows, cols] <= match_radius * radius[rows] + 1e-9
        ids[rows[accepted]] = previous.ids[cols[accepted]]
    unmatched = np.flatnonzero(ids < 0)  # labels are ordered by size, largest first
    ids[unmatched] = next_id + np.arange(len(unmatched))
    retired = sorted(set(previous.ids.tolist()) - set(ids.tolist()))
    return Matching(ids=ids, matched=count - len(unmatched), new=len(unmatched), retired=retired)


def stable_labels(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-device stable ids (NOISE stays NOISE)."""
    out = np.full(len(labels), NOISE, dtype=np.int64)
    members = labels != NOISE
    out[members] = ids[labels[members]]
    return out


def _median_radius(matrix: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each segment's median member distance, at least a quarter of the fleet's median (a
    segment of one, or of identical devices, would otherwise only match an identical centre)."""
    members = labels != NOISE
    distance = np.linalg.norm(matrix[members] - centres[labels[members]], axis=1)
    radius = np.zeros(len(centres))
    order = np.argsort(labels[members], kind="stable")
    grouped = np.split(distance[order], np.cumsum(np.bincount(labels[members], minlength=len(centres)))[:-1])
    for label, values in enumerate(grouped):
        radius[label] = np.median(values) if len(values) else 0.0
    floor = 0.25 * float(np.median(distance)) if len(distance) else 0.0
    return np.maximum(radius, floor)
