"""Anomaly scores from two signals: distance from the device's segment and a PyOD detector. Pure.

Segment signal: each device's distance to its segment's centre (the coordinate-wise
median of its members), per dimension in units of the larger of the segment's
robust spread (1.4826 x MAD) and the fleet's standard deviation; then a robust z of
that distance among the segment's members (median and MAD). Segments too small to
be a norm of their own (the fewest devices covering the last `1 - large_coverage` of
the fleet, as in CBLOF), and density noise, are measured against the nearest large
segment instead, so a small group of similar oddities does not hide in a segment
of its own.

Detector signal: a PyOD detector on robust-standardised vectors, its scores turned
into a robust z over the fleet.

Combined: the detector's z, plus the segment z beyond `segment_margin`, so a device
counts as strange when the detector finds it odd or when it lies far outside its
segment. `score` maps the combined z to [0, 1] (0.5 at z = 3.5, the usual modified
z-score cut-off); `is_anomaly` is combined z >= `threshold`, or the top
`contamination` share when that is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from persona_pipeline.segments.clustering import NOISE

Detector = Literal["hbos", "ecod", "copod", "iforest", "knn"]
DETECTORS: tuple[Detector, ...] = ("hbos", "ecod", "copod", "iforest", "knn")
HALF_SCORE_Z = 3.5
MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class AnomalySettings:
    detector: Detector = "hbos"
    threshold: float = 3.5
    segment_margin: float = 5.0
    contamination: float | None = None
    large_coverage: float = 0.9
    large_ratio: float = 5.0
    detector_sample_size: int = 200_000
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {self.detector!r}")
        if self.contamination is not None and not 0 < self.contamination < 0.5:
            raise ValueError(f"contamination must be in (0, 0.5); got {self.contamination}")
        if not 0 < self.large_coverage <= 1:
            raise ValueError(f"large_coverage must be in (0, 1]; got {self.large_coverage}")


@dataclass
class SegmentDeviation:
    reference: np.ndarray  # the segment each device was compared with
    deviations: np.ndarray  # devices x dimensions, in units of the reference's spread
    distance_z: np.ndarray  # robust z of the scaled distance within the reference segment
    large_segments: np.ndarray


@dataclass
class AnomalyResult:
    score: np.ndarray
    is_anomaly: np.ndarray
    combined_z: np.ndarray
    segment_z: np.ndarray
    detector_z: np.ndarray
    deviation: SegmentDeviation
    settings: AnomalySettings


def score_anomalies(matrix: np.ndarray, segments: np.ndarray, settings: AnomalySettings) -> AnomalyResult:
    matrix = np.asarray(matrix, dtype=np.float64)
    deviation = segment_deviation(matrix, segments, settings.large_coverage, settings.large_ratio)
    detector_z = robust_z(detector_scores(matrix, settings.detector, settings))
    combined = combine(deviation.distance_z, detector_z, settings.segment_margin)
    return AnomalyResult(
        score=score_from_z(combined),
        is_anomaly=flag(combined, settings.threshold, settings.contamination),
        combined_z=combined,
        segment_z=deviation.distance_z,
        detector_z=detector_z,
        deviation=deviation,
        settings=settings,
    )


def combine(segment_z: np.ndarray, detector_z: np.ndarray, segment_margin: float) -> np.ndarray:
    return detector_z + np.maximum(segment_z - segment_margin, 0.0)


def score_from_z(z: np.ndarray) -> np.ndarray:
    positive = np.maximum(z, 0.0)
    return positive / (positive + HALF_SCORE_Z)


def flag(combined: np.ndarray, threshold: float, contamination: float | None) -> np.ndarray:
    if contamination is None or len(combined) == 0:
        return combined >= threshold
    count = int(np.ceil(contamination * len(combined)))
    flagged = np.zeros(len(combined), dtype=bool)
    flagged[np.argsort(-combined, kind="stable")[:count]] = True
    return flagged


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); the standard deviation when the MAD is 0."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    centre = np.median(values)
    spread = MAD_TO_SD * np.median(np.abs(values - centre))
    if spread <= 1e-12:
        spread = values.std()
    return (values - centre) / spread if spread > 1e-12 else np.zeros_like(values)


def robust_standardise(matrix: np.ndarray) -> np.ndarray:
    centre = np.median(matrix, axis=0)
    spread = MAD_TO_SD * np.median(np.abs(matrix - centre), axis=0)
    fallback = matrix.std(axis=0)
    scale = np.where(spread > 1e-12, spread, np.where(fallback > 1e-12, fallback, 1.0))
    return (matrix - centre) / scale


def large_segments(segments: np.ndarray, coverage: float, ratio: float) -> np.ndarray:
    """Segments that together hold `coverage` of the devices, or up to a size drop of `ratio`."""
    ids, sizes = np.unique(segments[segments != NOISE], return_counts=True)
    if len(ids) == 0:
        return ids
    order = np.lexsort((ids, -sizes))
    ids, sizes = ids[order], sizes[order]
    covered = np.cumsum(sizes) / sizes.sum()
    drop = np.append(sizes[:-1] / sizes[1:] >= ratio, False)
    last = (
        int(np.argmax((covered >= coverage) | drop)) if ((covered >= coverage) | drop).any() else len(ids) - 1
    )
    return np.sort(ids[: last + 1])


def segment_deviation(
    matrix: np.ndarray, segments: np.ndarray, coverage: float = 0.9, ratio: float = 5.0
) -> SegmentDeviation:
    large = large_segments(segments, coverage, ratio)
    n, dims = matrix.shape
    if len(large) == 0:  # every device is density noise: the fleet is the only norm
        segments = np.full(n, NOISE, dtype=np.int64)
        large = np.array([NOISE])
    fleet_sd = matrix.std(axis=0)
    centres = np.empty((len(large), dims))
    scales = np.empty((len(large), dims))
    spread = np.empty((len(large), 2))  # median and MAD-scale of the members' scaled distance
    for i, segment in enumerate(large):
        members = matrix[segments == segment]
        centres[i] = np.median(members, axis=0)
        mad = MAD_TO_SD * np.median(np.abs(members - centres[i]), axis=0)
        scales[i] = np.maximum(np.maximum(mad, fleet_sd), 1e-9)
        distance = np.linalg.norm((members - centres[i]) / scales[i], axis=1)
        spread[i] = _median_and_spread(distance)

    position = np.full(n, -1, dtype=np.int64)
    in_large = np.isin(segments, large)
    position[in_large] = np.searchsorted(large, segments[in_large])
    distance_z = np.empty(n)
    rows = np.flatnonzero(in_large)
    distance = np.linalg.norm((matrix[rows] - centres[position[rows]]) / scales[position[rows]], axis=1)
    distance_z[rows] = (distance - spread[position[rows], 0]) / spread[position[rows], 1]

    outside = np.flatnonzero(~in_large)
    if len(outside):
        candidates = np.stack(
            [
                (np.linalg.norm((matrix[outside] - centres[i]) / scales[i], axis=1) - spread[i, 0])
                / spread[i, 1]
                for i in range(len(large))
            ],
            axis=1,
        )
        position[outside] = candidates.argmin(axis=1)
        distance_z[outside] = candidates.min(axis=1)

    deviations = ((matrix - centres[position]) / scales[position]).astype(np.float32)
    return SegmentDeviation(
        reference=large[position],
        deviations=deviations,
        distance_z=distance_z,
        large_segments=large,
    )


def _median_and_spread(values: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(values))
    spread = MAD_TO_SD * float(np.median(np.abs(values - centre)))
    if spread <= 1e-12:
        spread = float(values.std())
    return centre, spread if spread > 1e-12 else 1.0


def detector_scores(matrix: np.ndarray, name: Detector, settings: AnomalySettings) -> np.ndarray:
    """Outlier scores (higher is stranger) of `name`, fitted on at most
    `detector_sample_size` devices and applied to all."""
    if len(matrix) < 3:
        return np.zeros(len(matrix))
    standardised = robust_standardise(matrix)
    detector = make_detector(name, settings.random_seed, len(matrix))
    if len(standardised) <= settings.detector_sample_size:
        detector.fit(standardised)
        return np.asarray(detector.decision_scores_, dtype=np.float64)
    rng = np.random.default_rng(settings.random_seed)
    sample = np.sort(rng.choice(len(standardised), size=settings.detector_sample_size, replace=False))
    detector.fit(standardised[sample])
    return np.concatenate(
        [
            detector.decision_function(standardised[start : start + 100_000])
            for start in range(0, len(standardised), 100_000)
        ]
    )


def make_detector(name: Detector, random_seed: int, rows: int):
    if name == "hbos":
        from pyod.models import hbos

        _cache_hbos_compilation(hbos)
        return hbos.HBOS()
    if name == "ecod":
        from pyod.models.ecod import ECOD

        return ECOD()
    if name == "copod":
        from pyod.models.copod import COPOD

        return COPOD()
    if name == "iforest":
        from pyod.models.iforest import IForest

        return IForest(random_state=random_seed)
    if name == "knn":
        from pyod.models.knn import KNN

        return KNN(n_neighbors=min(5, rows - 1))
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


def _cache_hbos_compilation(module) -> None:
    """PyOD compiles HBOS's scoring loop with numba in every process (about 5 s, more than the
    scoring itself on a fleet of thousands) and does not cache it; recompile it once with numba's
    on-disk cache. Left alone if a PyOD version no longer has that function."""
    compiled = getattr(module, "_calculate_outlier_scores", None)
    if compiled is None or not hasattr(compiled, "py_func") or getattr(compiled, "_disk_cached", False):
        return
    import numba

    cached = numba.njit(cache=True)(compiled.py_func)
    cached._disk_cached = True
    module._calculate_outlier_scores = cached
