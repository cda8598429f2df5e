"""Segmentation, stable ids, readable key statistics and segment profiles (pure functions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_pipeline.feature_schema import load_feature_schema
from persona_pipeline.formatting import format_range, format_share, format_values
from persona_pipeline.segments.clustering import NOISE, ClusteringSettings, fit_segments, refit_reason
from persona_pipeline.segments.key_stats import dimension_groups, readable_values, segment_stats
from persona_pipeline.segments.profile import describe_segments, segment_traits
from persona_pipeline.segments.stable_ids import (
    UNKNOWN,
    match_segment_ids,
    previous_segments,
    stable_labels,
)

pytestmark = pytest.mark.store_agnostic

CENTRES = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])


def blobs(per_blob: int = 200, seed: int = 0, centres: np.ndarray = CENTRES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(centres)), per_blob)
    return centres[truth] + rng.normal(0, 0.2, (len(truth), centres.shape[1])), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_chooses_the_planted_number_of_segments_by_silhouette():
    matrix, truth = blobs()
    fit = fit_segments(matrix, ClusteringSettings(k_min=2, k_max=8))
    assert fit.n_segments == 3
    assert max(fit.k_scores, key=fit.k_scores.get) == 3
    assert same_partition(fit.labels, truth)
    assert fit.silhouette is not None and fit.silhouette > 0.7
    assert np.allclose(fit.distances, np.linalg.norm(matrix - fit.centres[fit.labels], axis=1))


def test_choosing_k_on_a_sample_still_fits_every_device():
    matrix, truth = blobs(per_blob=2_000)
    fit = fit_segments(matrix, ClusteringSettings(k_min=2, k_max=6, selection_sample_size=300))
    assert fit.n_segments == 3 and len(fit.labels) == len(matrix)
    assert same_partition(fit.labels, truth)


def test_a_fleet_larger_than_the_fit_sample_is_fitted_on_a_sample_and_every_device_joins_a_segment():
    matrix, truth = blobs(per_blob=2_000)
    whole = fit_segments(matrix, ClusteringSettings(k_min=2, k_max=6, selection_sample_size=300))
    sampled = fit_segments(
        matrix, ClusteringSettings(k_min=2, k_max=6, selection_sample_size=300, fit_sample_size=1_000)
    )
    assert "fitted on 1,000 devices" in sampled.note and "fitted on" not in whole.note
    assert len(sampled.labels) == len(matrix) and same_partition(sampled.labels, truth)
    assert np.array_equal(sampled.labels, whole.labels)
    assert np.allclose(sampled.centres, whole.centres)  # the means of every member, either way
    assert np.allclose(sampled.distances, np.linalg.norm(matrix - sampled.centres[sampled.labels], axis=1))


def test_fixed_number_of_segments_and_minibatch_kmeans():
    matrix, _ = blobs()
    fixed = fit_segments(matrix, ClusteringSettings(n_clusters=5))
    assert fixed.n_segments == 5 and fixed.k_scores == {}
    minibatch = fit_segments(matrix, ClusteringSettings(algorithm="minibatch_kmeans", k_min=2, k_max=5))
    assert minibatch.n_segments == 3


@pytest.mark.parametrize("algorithm", ["dbscan", "hdbscan"])
def test_density_algorithms_leave_a_far_device_in_no_segment(algorithm):
    matrix, truth = blobs()
    matrix = np.vstack([matrix, [[20.0, 20.0, 20.0]]])
    fit = fit_segments(matrix, ClusteringSettings(algorithm=algorithm))
    assert fit.labels[-1] == NOISE
    assert fit.n_segments == 3
    assert same_partition(fit.labels[:-1][fit.labels[:-1] != NOISE], truth[fit.labels[:-1] != NOISE])
    nearest = np.linalg.norm(fit.centres - matrix[-1], axis=1).min()
    assert fit.distances[-1] == pytest.approx(nearest)


def test_settings_refuse_impossible_ranges():
    with pytest.raises(ValueError, match="k_min"):
        ClusteringSettings(k_min=6, k_max=3)
    with pytest.raises(ValueError, match="n_clusters"):
        ClusteringSettings(n_clusters=1)


def test_ids_follow_segments_whatever_labels_the_fit_gives_them():
    matrix, truth = blobs()
    previous_ids = np.array([7, 3, 12])[truth]  # ids from an earlier run
    previous = previous_segments(matrix, previous_ids)
    shuffled_labels = np.array([2, 0, 1])[truth]  # a refit that numbers the blobs otherwise
    centres = np.array([matrix[shuffled_labels == label].mean(axis=0) for label in range(3)])
    matching = match_segment_ids(matrix, shuffled_labels, centres, previous, next_id=13)
    assert matching.matched == 3 and matching.new == 0 and matching.retired == []
    assert np.array_equal(stable_labels(shuffled_labels, matching.ids), previous_ids)


def test_a_new_segment_gets_a_new_id_and_a_vanished_one_is_retired():
    matrix, truth = blobs(centres=np.vstack([CENTRES, [[0.0, 0.0, 4.0]]]))
    previous_ids = np.where(truth == 3, UNKNOWN, np.array([5, 6, 9, -99])[truth])  # blob 3 is new
    previous_ids[truth == 2] = 9
    previous = previous_segments(matrix, previous_ids)
    labels = truth.copy()
    centres = np.array([matrix[labels == label].mean(axis=0) for label in range(4)])
    matching = match_segment_ids(matrix, labels, centres, previous, next_id=10)
    assert matching.ids.tolist() == [5, 6, 9, 10]
    # Blob 1 vanishes: its devices move to a brand-new place, so its old centre matches nothing.
    moved = matrix.copy()
    moved[truth == 1] += np.array([0.0, -9.0, 0.0])
    labels_after = truth.copy()
    centres_after = np.array([moved[labels_after == label].mean(axis=0) for label in range(4)])
    stale = previous_segments(matrix, stable_labels(labels, matching.ids))
    after = match_segment_ids(moved, labels_after, centres_after, stale, next_id=11, match_radius=1.0)
    assert after.ids.tolist() == [5, 11, 9, 10]
    assert after.retired == [6]


def test_kmeans_keeps_the_previous_number_of_segments_when_no_k_is_clearly_better():
    matrix, _ = blobs()
    first = fit_segments(matrix, ClusteringSettings(k_min=2, k_max=6))
    previous = previous_segments(matrix, first.labels)
    again = fit_segments(matrix, ClusteringSettings(k_min=2, k_max=6), previous.centres)
    assert again.warm_started and np.array_equal(again.labels, first.labels)
    four = fit_segments(matrix, ClusteringSettings(n_clusters=4))
    sticky = fit_segments(
        matrix,
        ClusteringSettings(k_min=2, k_max=6, k_switch_margin=1.0),
        previous_segments(matrix, four.labels).centres,
    )
    assert sticky.n_segments == 4 and "kept" in sticky.note
    switching = fit_segments(
        matrix, ClusteringSettings(k_min=2, k_max=6), previous_segments(matrix, four.labels).centres
    )
    assert switching.n_segments == 3


def profile_rows(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["device_id", "key", "value"])
    frame["value_number"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["customer_id"] = None
    frame["observed_at"] = pd.Timestamp("2026-03-01", tz="UTC")
    return frame


def small_fleet() -> tuple[pd.DataFrame, np.ndarray]:
    rows = []
    for i in range(10):
        device = f"d{i}"
        gamer = i < 5
        rows += [
            (device, "device.location.city", "Berlin" if gamer else ("Paris" if i % 2 else "Madrid")),
            (device, "device.usage.app_games_duration", str(9000 + i if gamer else 60)),
            (device, "device.usage.app_podcast_duration", "600" if i == 9 else "0"),
            (device, "device.health.crash_count", "0"),
            (device, "device.settings.dark_mode", "true" if gamer else "false"),
        ]
    rows.append(("d9", "device.connection.signal_strength", "-108"))
    return profile_rows(rows), np.array([1] * 5 + [2] * 5)


def test_readable_values_and_segment_traits_speak_in_the_keys_units():
    schema = load_feature_schema()
    profiles, segments = small_fleet()
    devices = np.array([f"d{i}" for i in range(10)], dtype=object)
    vectors = pd.DataFrame(0.0, index=devices, columns=schema.dimension_names)
    vectors.loc["d3", "derived.location.moved_recently"] = 0.6
    values = readable_values(profiles, schema, devices, vectors)

    assert values.numeric.loc["d9", "device.connection.signal_strength"] == -108
    assert values.numeric.loc["d0", "device.connection.signal_strength"] == -85  # the schema's fill
    assert values.numeric.loc["d0", "device.usage.app_maps_duration"] == 0  # not reported: no use
    assert values.numeric.loc["d9", "device.usage.app_*_duration[<other>]"] == 600
    assert values.numeric.loc["d0", "derived.usage.total_app_duration"] == 9000
    assert values.categorical.loc["d0", "device.settings.dark_mode"] == "yes"
    assert values.categorical.loc["d3", "derived.location.moved_recently"] == "yes"
    assert set(dimension_groups(schema)) <= set(values.groups.index)

    stats = segment_stats(values, segments)
    traits = segment_traits(values, stats, top=3)
    described = describe_segments(stats, traits).set_index("segment")
    assert described.loc[1, "devices"] == 5 and described.loc[1, "share"] == 0.5
    assert "games use 2.5 h (fleet" in described.loc[1, "traits"]
    assert "city Berlin 100% (fleet 50%)" in described.loc[1, "traits"]
    assert described.loc[1, "name"].count(" · ") == 1


def test_a_fleet_that_reports_one_key_alike_gets_segments_without_traits():
    schema = load_feature_schema()
    devices = np.array([f"d{i}" for i in range(6)], dtype=object)
    profiles = profile_rows([(device, "device.location.city", "Berlin") for device in devices])
    vectors = pd.DataFrame(0.0, index=devices, columns=schema.dimension_names)
    values = readable_values(profiles, schema, devices, vectors)
    stats = segment_stats(values, np.ones(6, dtype=int))
    described = describe_segments(stats, segment_traits(values, stats)).set_index("segment")
    assert described.loc[1, "name"] == "like the fleet" and described.loc[1, "devices"] == 6


def test_values_are_formatted_with_units_and_ranges():
    assert format_values([14, -108.0, 0.25, 12345.6, np.nan], "dBm").tolist() == [
        "14 dBm",
        "-108 dBm",
        "0.25 dBm",
        "12,346 dBm",
        "not reported",
    ]
    assert format_values([30, 720, 9000], "seconds").tolist() == ["30 s", "12 min", "2.5 h"]
    assert format_values([20.5], "%/h").tolist() == ["20.5%/h"]
    assert format_range(
        pd.Series([0.0, -74.0, 300.0]), pd.Series([1.0, -66.0, 9000.0]), "seconds"
    ).tolist() == [
        "0–1 s",
        "-74 to -66 s",
        "5 min–2.5 h",
    ]
    assert format_range(pd.Series([3.0]), pd.Series([3.0]), None).tolist() == ["3"]
    assert format_share([0.923, 0.05]).tolist() == ["92%", "5%"]


def test_segments_are_fitted_anew_on_schedule_on_a_large_change_or_when_asked():
    now = np.datetime64("2026-11-26T00:30:00")
    usual = dict(
        algorithm="kmeans",
        forced=False,
        refit_every_days=7,
        refit_changed_share=0.2,
        fitted_at=now - np.timedelta64(2, "D"),
        now=now,
        changed=1_000,
        devices=100_000,
    )
    assert refit_reason(**usual) is None
    assert refit_reason(**{**usual, "fitted_at": now - np.timedelta64(7, "D")}).startswith(
        "last fit 7.0 days"
    )
    assert "over refit_changed_share=0.2" in refit_reason(**{**usual, "changed": 20_001})
    assert refit_reason(**{**usual, "changed": 20_000}) is None
    assert refit_reason(**{**usual, "forced": True}) == "refit requested"
    assert refit_reason(**{**usual, "refit_every_days": 0}).startswith("refit_every_days is 0")
    assert refit_reason(**{**usual, "algorithm": "hdbscan"}) == "hdbscan refits every run"
    assert refit_reason(**{**usual, "fitted_at": None}) == "no fit of this feature space yet"
    assert refit_reason(**{**usual, "devices": 0, "changed": 0}) is not None


def test_a_retired_segment_id_says_why_and_keeps_its_reason():
    from persona_pipeline.segments.storage import updated_registry

    then, now = pd.Timestamp("2026-03-01", tz="UTC"), pd.Timestamp("2026-03-02", tz="UTC")
    registry = pd.DataFrame(
        {
            "cluster_id": [1, 2, 9],
            "name": ["a", "b", "old"],
            "devices": [10, 5, 0],
            "traits": ["", "", ""],
            "active": [True, True, False],
            "first_seen_at": [then] * 3,
            "last_seen_at": [then] * 3,
            "retired_reason": [None, None, "last fit 7.0 days ago"],
        }
    )
    described = pd.DataFrame({"segment": [1, 3], "name": ["a", "c"], "devices": [12, 3], "traits": ["", ""]})
    merged = updated_registry(registry, described, now, "a new weights version").set_index("cluster_id")
    assert merged.loc[[1, 3], "active"].all() and not merged.loc[[2, 9], "active"].any()
    assert merged.loc[2, "retired_reason"] == "a new weights version"
    assert merged.loc[9, "retired_reason"] == "last fit 7.0 days ago"
    assert merged.loc[[1, 3], "retired_reason"].isna().all()


def test_the_stability_check_warns_when_a_fit_moves_the_segments_and_not_when_the_schema_changed():
    from persona_pipeline.segments.reporting import stability_check
    from persona_pipeline.segments.stable_ids import UNKNOWN

    previous = np.repeat([1, 2, 3], 20)
    renamed = np.repeat([7, 8, 9], 20)  # the same groups under other ids
    shuffled = np.random.default_rng(0).permutation(previous)
    assert stability_check(previous, renamed, 0.7, schema_changed=False).passed
    moved = stability_check(previous, shuffled, 0.7, schema_changed=False)
    assert not moved.passed and moved.metadata["adjusted_rand_index"].value < 0.7
    assert stability_check(previous, shuffled, 0.7, schema_changed=True).passed
    new_devices = np.full(60, UNKNOWN)
    assert stability_check(new_devices, shuffled, 0.7, schema_changed=False).passed
