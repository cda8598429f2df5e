"""Measuring anomaly scores against labels: ROC-AUC, precision at the planted count,
and labelled public datasets made anomaly-style the way the ODDS collection does. Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn import datasets as sk_datasets
from sklearn.metrics import roc_auc_score

from persona_pipeline.anomalies.scoring import (
    DETECTORS,
    AnomalySettings,
    combine,
    detector_scores,
    robust_z,
    segment_deviation,
)
from persona_pipeline.segments.clustering import ClusteringSettings, fit_segments


def precision_at_count(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of true anomalies among the `labels.sum()` highest scores."""
    count = int(labels.sum())
    if count == 0:
        return float("nan")
    top = np.argsort(-scores, kind="stable")[:count]
    return float(labels[top].mean())


def flag_quality(labels: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """Precision and recall of the flags, and false alarms per 1,000 devices without a label."""
    labels, flagged = np.asarray(labels, dtype=bool), np.asarray(flagged, dtype=bool)
    hits = int((labels & flagged).sum())
    return {
        "flagged": int(flagged.sum()),
        "precision": hits / flagged.sum() if flagged.any() else float("nan"),
        "recall": hits / labels.sum() if labels.any() else float("nan"),
        "false_alarms_per_1000": 1000 * (flagged & ~labels).sum() / max((~labels).sum(), 1),
    }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class PublicDataset:
    """An ODDS-style anomaly set: one class, downsampled, against the other classes."""

    name: str
    loader: Callable
    anomaly_class: int
    anomaly_share: float
    description: str


# Shares follow ODDS: WBC 21 malignant in 378, wine 10 of class 1 in 129, optdigits
# 150 zeros in 5216. scikit-learn ships the data (no download).
PUBLIC_DATASETS = (
    PublicDataset(
        "breast_cancer",
        sk_datasets.load_breast_cancer,
        0,
        21 / 378,
        "scikit-learn breast cancer (WDBC): malignant as anomalies, 5.6%",
    ),
    PublicDataset(
        "wine", sk_datasets.load_wine, 0, 10 / 129, "scikit-learn wine: cultivar 1 as anomalies, 7.8%"
    ),
    PublicDataset(
        "digits",
        sk_datasets.load_digits,
        0,
        150 / 5216,
        "scikit-learn digits (optdigits): zeros as anomalies, 2.9%",
    ),
)


def anomaly_sample(dataset: PublicDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's other classes plus a random `anomaly_share` of its anomaly class,
    min-max scaled to [0, 1] per column (as the feature schema scales keys)."""
    bunch = dataset.loader()
    features, target = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(target != dataset.anomaly_class)
    candidates = np.flatnonzero(target == dataset.anomaly_class)
    wanted = max(round(dataset.anomaly_share * len(normal) / (1 - dataset.anomaly_share)), 2)
    chosen = rng.choice(candidates, size=min(wanted, len(candidates)), replace=False)
    rows = np.concatenate([normal, np.sort(chosen)])
    matrix = features[rows]
    low, high = matrix.min(axis=0), matrix.max(axis=0)
    scaled = (matrix - low) / np.where(high > low, high - low, 1.0)
    return scaled, np.isin(rows, chosen)


def method_scores(
    matrix: np.ndarray,
    clustering: ClusteringSettings,
    anomalies: AnomalySettings,
    detectors: tuple[str, ...] = DETECTORS,
) -> dict[str, np.ndarray]:
    """Every detector alone, the segment signal alone, and the combined score with the
    configured detector, all from the functions the assets use."""
    fit = fit_segments(matrix, clustering)
    segment_z = segment_deviation(
        np.asarray(matrix, dtype=np.float64), fit.labels, anomalies.large_coverage, anomalies.large_ratio
    ).distance_z
    scores = {name: robust_z(detector_scores(matrix, name, anomalies)) for name in detectors}
    scores["segment"] = segment_z
    for name in detectors:
        scores[f"combined:{name}"] = combine(segment_z, scores[name], anomalies.segment_margin)
    return scores


def evaluate_public(
    seeds: int,
    clustering: ClusteringSettings,
    anomalies: AnomalySettings,
    datasets: tuple[PublicDataset, ...] = PUBLIC_DATASETS,
) -> pd.DataFrame:
    """Mean ROC-AUC and precision at the planted count over `seeds` draws of each dataset:
    one row per (dataset, method)."""
    rows = []
    for dataset in datasets:
        for seed in range(seeds):
            matrix, labels = anomaly_sample(dataset, seed)
            for method, scores in method_scores(matrix, clustering, anomalies).items():
                rows.append(
                    {
                        "dataset": dataset.name,
                        "method": method,
                        "roc_auc": roc_auc(labels, scores),
                        "precision_at_planted": precision_at_count(labels, scores),
                        "devices": len(labels),
                        "anomalies": int(labels.sum()),
                    }
                )
    frame = pd.DataFrame(rows)
    return frame.groupby(["dataset", "method"], sort=False).mean(numeric_only=True).reset_index()
