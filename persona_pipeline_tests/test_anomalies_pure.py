"""Anomaly scoring, reasons and the evaluation on public data (pure functions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_pipeline.anomalies.evaluation import (
    PUBLIC_DATASETS,
    anomaly_sample,
    evaluate_public,
    precision_at_count,
)
from persona_pipeline.anomalies.reasons import explain
from persona_pipeline.anomalies.scoring import (
    AnomalySettings,
    flag,
    large_segments,
    robust_z,
    score_anomalies,
    score_from_z,
)
from persona_pipeline.segments.clustering import NOISE, ClusteringSettings
from persona_pipeline.segments.key_stats import CATEGORICAL, NUMERIC, ReadableValues, segment_stats

pytestmark = pytest.mark.store_agnostic


def test_robust_z_is_not_pulled_by_the_outlier_it_should_find():
    values = np.r_[np.random.default_rng(0).normal(10, 1, 999), 1e6]
    z = robust_z(values)
    assert abs(np.median(z)) < 0.1
    assert np.percentile(np.abs(z[:-1]), 99) < 4  # a mean/std z would squash everyone to ~0
    assert z[-1] > 1e5
    assert np.array_equal(robust_z(np.full(5, 3.0)), np.zeros(5))


def test_scores_stay_in_0_1_and_the_flag_follows_a_threshold_or_a_share():
    z = np.array([-3.0, 0.0, 1.0, 3.5, 10.0, 1e9])
    scores = score_from_z(z)
    assert scores.min() == 0 and scores.max() <= 1 and np.all(np.diff(scores) >= 0)
    assert scores[3] == pytest.approx(0.5)
    assert flag(z, threshold=3.5, contamination=None).tolist() == [False, False, False, True, True, True]
    assert flag(z, threshold=3.5, contamination=0.2).sum() == 2


def test_large_segments_cover_most_devices_and_stop_at_a_size_drop():
    segments = np.repeat([1, 2, 3, 4], [500, 300, 150, 50])
    assert large_segments(segments, coverage=0.9, ratio=5).tolist() == [1, 2, 3]
    assert large_segments(np.repeat([1, 2], [990, 10]), coverage=0.5, ratio=5).tolist() == [1]
    assert large_segments(np.r_[np.repeat(1, 10), [NOISE] * 3], 0.9, 5).tolist() == [1]


def fleet_with_oddities(seed: int = 0):
    """Two segments of normal devices; 3 devices far off one key; a tight group of 6 odd ones."""
    rng = np.random.default_rng(seed)
    normal = np.vstack([rng.normal(0, 0.1, (400, 4)), rng.normal([2, 2, 0, 0], 0.1, (300, 4))])
    segments = np.repeat([1, 2], [400, 300])
    strays = rng.normal([0, 0, 1.5, 0], 0.1, (3, 4))  # in segment 1, far on dimension 2
    group = rng.normal([2, 2, 0, 1.2], 0.02, (6, 4))  # a small cluster of its own (segment 3)
    matrix = np.vstack([normal, strays, group])
    segments = np.r_[segments, [1, 1, 1], [3] * 6]
    planted = np.r_[np.zeros(700, bool), np.ones(9, bool)]
    return matrix, segments, planted


@pytest.mark.parametrize("detector", ["hbos", "ecod", "copod", "iforest", "knn"])
def test_planted_oddities_are_flagged_with_every_detector(detector):
    matrix, segments, planted = fleet_with_oddities()
    result = score_anomalies(matrix, segments, AnomalySettings(detector=detector))
    assert result.is_anomaly[planted].all()
    assert result.is_anomaly.mean() < 0.05  # no fixed share is forced on the fleet
    if detector != "knn":  # KNN alone finds the tight group normal (its neighbours are each other)
        assert precision_at_count(planted, result.combined_z) == 1.0
    # The tight group is its own tiny segment: it is measured against segment 2, not itself.
    assert set(result.deviation.reference[-6:]) == {2}
    assert np.all((result.score >= 0) & (result.score <= 1))


def test_settings_refuse_unknown_detectors_and_silly_shares():
    with pytest.raises(ValueError, match="detector must be one of"):
        AnomalySettings(detector="lof")
    with pytest.raises(ValueError, match="contamination"):
        AnomalySettings(contamination=0.7)


def test_reasons_name_the_deviating_keys_with_device_and_segment_values():
    matrix, segments, _ = fleet_with_oddities()
    result = score_anomalies(matrix, segments, AnomalySettings())
    devices = np.array([f"d{i}" for i in range(len(matrix))], dtype=object)
    index = pd.Index(devices, name="device_id")
    crashes = np.r_[np.zeros(700), [14, 20, 17], np.zeros(6)]
    city = np.where(np.arange(len(matrix)) < 400, "Berlin", "Paris")
    values = ReadableValues(
        numeric=pd.DataFrame({"crash": crashes, "drain": matrix[:, 3] * 10}, index=index),
        categorical=pd.DataFrame({"city": city}, index=index),
        groups=pd.DataFrame(
            {
                "kind": [NUMERIC, NUMERIC, CATEGORICAL],
                "label": ["crashes", "drain", "city"],
                "unit": [None, "%/h", None],
            },
            index=pd.Index(["crash", "drain", "city"], name="group"),
        ),
    )
    stats = segment_stats(values, segments)
    rows = np.array([700, 706, 0])
    reasons = explain(rows, result, ["city", "city", "crash", "drain"], values, stats)
    assert reasons[700].startswith("crashes 14 vs 0;")
    assert "(segment 1: distance z" in reasons[700] and "hbos z" in reasons[700]
    assert reasons[706].startswith("drain 11.8%/h vs -0.7") and "(segment 2: " in reasons[706]
    assert reasons[0].startswith("no single key stands out")


def test_public_samples_follow_odds_shares():
    matrix, labels = anomaly_sample(PUBLIC_DATASETS[1], seed=0)  # wine: 10 of 129
    assert matrix.shape == (129, 13) and labels.sum() == 10
    assert matrix.min() == 0 and matrix.max() == 1


def test_combined_score_is_within_002_of_the_best_single_detector_on_public_data():
    results = evaluate_public(5, ClusteringSettings(), AnomalySettings())
    auc = results.pivot(index="method", columns="dataset", values="roc_auc")
    best_single = auc.loc[["hbos", "ecod", "copod", "iforest", "knn"]].max()
    combined = auc.loc["combined:hbos"]
    assert (combined >= best_single - 0.02).all(), pd.DataFrame({"combined": combined, "best": best_single})
    assert (combined > 0.8).all()


@pytest.mark.parametrize("devices", [1, 2, 3, 5])
def test_tiny_fleets_get_segments_scores_and_reasons(devices):
    from persona_pipeline.segments.clustering import fit_segments
    from persona_pipeline.segments.stable_ids import match_segment_ids, previous_segments, stable_labels

    matrix = np.random.default_rng(devices).random((devices, 4))
    fit = fit_segments(matrix, ClusteringSettings())
    previous = previous_segments(matrix, np.full(devices, -2))
    ids = stable_labels(fit.labels, match_segment_ids(matrix, fit.labels, fit.centres, previous, 1).ids)
    result = score_anomalies(matrix, ids, AnomalySettings())
    assert np.isfinite(fit.distances).all() and np.isfinite(result.score).all()
    values = ReadableValues(
        numeric=pd.DataFrame({"x": matrix[:, 0]}),
        categorical=pd.DataFrame({"c": ["a"] * devices}),
        groups=pd.DataFrame(
            {"kind": [NUMERIC, CATEGORICAL], "label": ["x", "c"], "unit": [None, None]},
            index=pd.Index(["x", "c"], name="group"),
        ),
    )
    reasons = explain(np.arange(devices), result, ["x", "x", "c", "c"], values, segment_stats(values, ids))
    assert len(reasons) == devices and reasons.str.contains("distance z").all()


def test_all_noise_devices_are_compared_with_the_fleet():
    from persona_pipeline.segments.clustering import fit_segments

    matrix = np.random.default_rng(0).random((30, 3)) * 100
    fit = fit_segments(matrix, ClusteringSettings(algorithm="dbscan", dbscan_eps=1e-6))
    assert (fit.labels == NOISE).all() and fit.n_segments == 0 and fit.silhouette is None
    assert np.allclose(fit.distances, np.linalg.norm(matrix - matrix.mean(axis=0), axis=1))
    result = score_anomalies(matrix, fit.labels, AnomalySettings())
    assert (result.deviation.reference == NOISE).all() and np.isfinite(result.score).all()


def test_as_many_segments_as_devices_has_no_silhouette():
    from persona_pipeline.segments.clustering import fit_segments

    fit = fit_segments(np.eye(4), ClusteringSettings(n_clusters=4))
    assert fit.n_segments == 4 and fit.silhouette is None


def test_a_key_the_device_never_reported_is_not_its_reason():
    matrix, segments, _ = fleet_with_oddities()
    result = score_anomalies(matrix, segments, AnomalySettings())
    index = pd.RangeIndex(len(matrix))
    network = pd.Series("wifi", index=index, dtype=object)
    network.iloc[700] = None  # the stray never reported its network
    values = ReadableValues(
        numeric=pd.DataFrame({"crash": np.r_[np.zeros(700), [14, 20, 17], np.zeros(6)]}),
        categorical=pd.DataFrame({"network": network}),
        groups=pd.DataFrame(
            {"kind": [NUMERIC, CATEGORICAL], "label": ["crashes", "network"], "unit": [None, None]},
            index=pd.Index(["crash", "network"], name="group"),
        ),
    )
    reasons = explain(
        np.array([700]),
        result,
        ["network", "network", "crash", "crash"],
        values,
        segment_stats(values, segments),
    )
    assert reasons[700].startswith("crashes 14") and "not reported" not in reasons[700]
