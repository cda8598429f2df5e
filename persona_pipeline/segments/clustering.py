"""Segmenting persona vectors: K-means by default, DBSCAN/HDBSCAN as options. Pure.

The number of segments is chosen on a sample (silhouette over a range of k), so
the cost of choosing does not grow with the fleet; the final fit runs on every
device (on a fleet larger than `fit_sample_size`, on a sample of that many, every
device then joining its nearest centre), started from the sample's (or the previous
run's) centres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from sklearn.cluster import DBSCAN, HDBSCAN, KMeans, MiniBatchKMeans
from sklearn.metrics import pairwise_distances_argmin_min, silhouette_score
from sklearn.neighbors import NearestNeighbors

Algorithm = Literal["kmeans", "minibatch_kmeans", "dbscan", "hdbscan"]
NOISE = -1


@dataclass(frozen=True)
class ClusteringSettings:
    algorithm: Algorithm = "kmeans"
    n_clusters: int | None = None
    k_min: int = 4
    k_max: int = 12
    k_switch_margin: float = 0.01
    selection_sample_size: int = 20_000
    silhouette_sample_size: int = 5_000
    fit_sample_size: int = 200_000
    n_init: int = 3
    dbscan_eps: float | None = None
    dbscan_min_samples: int = 10
    hdbscan_min_cluster_size: int = 25
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.n_clusters is not None and self.n_clusters < 2:
            raise ValueError(f"n_clusters must be at least 2, got {self.n_clusters}")
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")


@dataclass
class SegmentFit:
    """Labels 0..m-1 per device (NOISE for density outliers) and what the fit measured."""

    labels: np.ndarray
    centres: np.ndarray  # m x dimensions, the mean of each label's members
    distances: np.ndarray  # each device's distance to its centre (noise: to the nearest)
    algorithm: str
    silhouette: float | None
    k_scores: dict[int, float] = field(default_factory=dict)
    warm_started: bool = False
    note: str = ""

    @property
    def n_segments(self) -> int:
        return len(self.centres)


def fit_segments(
    matrix: np.ndarray,
    settings: ClusteringSettings,
    previous_centres: np.ndarray | None = None,
    keep_count: bool = False,
) -> SegmentFit:
    """Segment the rows of `matrix`.

    `previous_centres` (the previous run's segments, measured in today's space) let
    K-means keep their number when it scores about as well as the best, and start
    from them, so an unchanged fleet gets the same segments. With `keep_count`, K-means
    keeps their number without choosing (a new weights version re-weights the same fleet).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if len(matrix) < 3:
        labels = np.zeros(len(matrix), dtype=np.int64)
        return _finish(matrix, labels, settings.algorithm, None, {}, note="fewer than 3 devices: one segment")
    if settings.algorithm in ("dbscan", "hdbscan"):
        return _fit_density(matrix, settings)
    return _fit_kmeans(matrix, settings, previous_centres, keep_count)


def _fit_kmeans(
    matrix: np.ndarray, settings: ClusteringSettings, previous: np.ndarray | None, keep_count: bool = False
) -> SegmentFit:
    rng = np.random.default_rng(settings.random_seed)
    sample = _sample_rows(matrix, settings.selection_sample_size, rng)
    distinct = len(np.unique(sample, axis=0))
    k_high = min(settings.k_max, distinct - 1, len(sample) - 1)
    k_scores: dict[int, float] = {}
    sample_fits: dict[int, np.ndarray] = {}
    if settings.n_clusters is not None:
        k = min(settings.n_clusters, max(distinct, 1))
        note = "k fixed by configuration"
    elif keep_count and previous is not None and 2 <= len(previous) <= distinct:
        k = len(previous)
        note = "k kept: a new weights version re-weights the same segments"
    elif k_high < 2:
        k = max(min(distinct, 2), 1)
        note = "too few distinct vectors to choose k"
    else:
        silhouette_rows = _sample_rows(np.arange(len(sample)), settings.silhouette_sample_size, rng)
        for candidate in range(min(settings.k_min, k_high), k_high + 1):
            model = _kmeans(settings, candidate, settings.n_init).fit(sample)
            sample_fits[candidate] = model.cluster_centers_
            k_scores[candidate] = float(
                silhouette_score(sample[silhouette_rows], model.labels_[silhouette_rows])
            )
        k = max(k_scores, key=lambda c: (k_scores[c], -c))
        note = "k by silhouette on a sample"
        previous_k = None if previous is None else len(previous)
        if previous_k in k_scores and k_scores[k] - k_scores[previous_k] < settings.k_switch_margin:
            k, note = previous_k, "k kept from the previous run (no clearly better k)"

    warm = previous is not None and len(previous) == k
    fit_on = matrix
    if len(matrix) > settings.fit_sample_size:
        fit_on = matrix[_sample_rows(np.arange(len(matrix)), settings.fit_sample_size, rng)]
        note += f"; fitted on {len(fit_on):,} devices, each device joining its nearest centre"
    if warm:
        model = _kmeans(settings, k, 1, init=previous).fit(fit_on)
    elif k in sample_fits and len(sample) < len(fit_on):
        model = _kmeans(settings, k, 1, init=sample_fits[k]).fit(fit_on)
    else:
        model = _kmeans(settings, k, settings.n_init).fit(fit_on)
    raw = model.labels_ if fit_on is matrix else nearest_centre(matrix, model.cluster_centers_)[0]
    labels = _relabel_by_size(raw)
    silhouette = _silhouette(matrix, labels, settings, rng)
    fit = _finish(matrix, labels, settings.algorithm, silhouette, k_scores, note=note)
    fit.warm_started = warm
    return fit


def _kmeans(settings: ClusteringSettings, k: int, n_init: int, init: np.ndarray | None = None):
    start = "k-means++" if init is None else init
    if settings.algorithm == "minibatch_kmeans":
        return MiniBatchKMeans(
            n_clusters=k, n_init=n_init, init=start, batch_size=4096, random_state=settings.random_seed
        )
    return KMeans(n_clusters=k, n_init=n_init, init=start, random_state=settings.random_seed)


def _fit_density(matrix: np.ndarray, settings: ClusteringSettings) -> SegmentFit:
    rng = np.random.default_rng(settings.random_seed)
    if settings.algorithm == "dbscan":
        eps = settings.dbscan_eps
        note = f"eps {eps:.4g} from configuration" if eps is not None else ""
        if eps is None:
            eps = _auto_eps(matrix, settings.dbscan_min_samples, rng)
            neighbour = settings.dbscan_min_samples
            note = f"eps {eps:.4g}: 90th percentile of the distance to the {neighbour}th neighbour"
        raw = DBSCAN(eps=eps, min_samples=settings.dbscan_min_samples).fit_predict(matrix)
    else:
        size = max(min(settings.hdbscan_min_cluster_size, len(matrix) - 1), 2)
        raw = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(matrix)
        note = f"min_cluster_size {size}"
    labels = _relabel_by_size(raw)
    silhouette = _silhouette(matrix, labels, settings, rng)
    return _finish(matrix, labels, settings.algorithm, silhouette, {}, note=note)


def _auto_eps(matrix: np.ndarray, min_samples: int, rng: np.random.Generator) -> float:
    sample = _sample_rows(matrix, 5_000, rng)
    neighbours = min(min_samples, len(sample) - 1)
    distances, _ = NearestNeighbors(n_neighbors=neighbours + 1).fit(sample).kneighbors(sample)
    eps = float(np.percentile(distances[:, -1], 90))
    return eps if eps > 0 else 1e-6


def _finish(
    matrix: np.ndarray,
    labels: np.ndarray,
    algorithm: str,
    silhouette: float | None,
    k_scores: dict[int, float],
    note: str,
) -> SegmentFit:
    centres = segment_centres(matrix, labels)
    members = labels != NOISE
    if not len(centres):  # every device is noise: its distance is to the fleet's mean
        distances = np.linalg.norm(matrix - matrix.mean(axis=0), axis=1)
        return SegmentFit(labels, centres, distances, algorithm, silhouette, k_scores, note=note)
    distances = np.empty(len(matrix))
    distances[members] = np.linalg.norm(matrix[members] - centres[labels[members]], axis=1)
    if (~members).any():
        distances[~members] = nearest_centre(matrix[~members], centres)[1]
    return SegmentFit(labels, centres, distances, algorithm, silhouette, k_scores, note=note)


def segment_centres(matrix: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of each label 0..max(labels)'s members (NOISE rows ignored)."""
    members = labels != NOISE
    count = int(labels[members].max()) + 1 if members.any() else 0
    sums = np.zeros((count, matrix.shape[1]))
    np.add.at(sums, labels[members], matrix[members])
    sizes = np.bincount(labels[members], minlength=count)
    return sums / np.maximum(sizes, 1)[:, None]


def nearest_centre(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to each point's nearest centre (computed in chunks)."""
    return pairwise_distances_argmin_min(points, centres)


def _relabel_by_size(raw: np.ndarray) -> np.ndarray:
    """Labels 0..m-1 by descending size (ties by first appearance), NOISE kept."""
    labels = np.full(len(raw), NOISE, dtype=np.int64)
    members = raw != NOISE
    if not members.any():
        return labels
    values, first, sizes = np.unique(raw[members], return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))
    mapping = np.empty(values.max() + 1, dtype=np.int64)
    mapping[values[order]] = np.arange(len(values))
    labels[members] = mapping[raw[members]]
    return labels


def _silhouette(
    matrix: np.ndarray, labels: np.ndarray, settings: ClusteringSettings, rng: np.random.Generator
) -> float | None:
    members = np.flatnonzero(labels != NOISE)
    rows = members[_sample_rows(np.arange(len(members)), settings.silhouette_sample_size, rng)]
    if not 2 <= len(np.unique(labels[rows])) <= len(rows) - 1:  # silhouette's own domain
        return None
    return float(silhouette_score(matrix[rows], labels[rows]))


def _sample_rows(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= size:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=size, replace=False))]


def refit_reason(
    *,
    algorithm: Algorithm,
    forced: bool,
    refit_every_days: int,
    refit_changed_share: float,
    fitted_at: np.datetime64 | None,
    now: np.datetime64,
    changed: int,
    devices: int,
) -> str | None:
    """Why this run must fit the segments anew, or None: assign the changed devices to the last
    fit's centres. A fit is due after `refit_every_days`, when more than `refit_changed_share` of
    the fleet changed, for density algorithms (their segments have no centres to assign to), and
    when there is no fit of the current feature space."""
    if forced:
        return "refit requested"
    if refit_every_days == 0:
        return "refit_every_days is 0: every run refits"
    if algorithm in ("dbscan", "hdbscan"):
        return f"{algorithm} refits every run"
    if fitted_at is None:
        return "no fit of this feature space yet"
    age = (now - fitted_at) / np.timedelta64(1, "D")
    if age >= refit_every_days:
        return f"last fit {age:.1f} days ago (refit_every_days={refit_every_days})"
    if devices == 0 or changed > refit_changed_share * devices:
        return (
            f"{changed:,} of {devices:,} devices changed (over refit_changed_share={refit_changed_share:g})"
        )
    return None
