"""Anomaly norms: fitted on the fleet, applied to the devices that change between fits. Pure."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from persona_pipeline.anomalies.scoring import (
    REFERENCE_POINTS,
    AnomalySettings,
    EvidenceReference,
    calibrated_flags,
    drift,
    fit_norms,
    log_p_values,
    score_with_norms,
)
from persona_pipeline.segments.sampling import stratified_sample

ROLES = np.array(["health"] * 3 + ["behaviour"] * 3 + ["context"] * 2, dtype=object)


def healthy_fleet(devices: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    segments = rng.integers(0, 4, devices)
    centres = rng.normal(scale=4.0, size=(4, len(ROLES)))
    centres[:, :3] = 0.0  # health keys do not depend on the segment
    return centres[segments] + rng.normal(size=(devices, len(ROLES))), segments


@pytest.mark.parametrize("detector", ["hbos", "iforest"])
def test_the_fleet_scored_against_its_own_norms_gets_its_own_signals_back(detector):
    matrix, segments = healthy_fleet(2000, seed=1)
    matrix[:8, :3] += 9.0  # eight faults
    settings = AnomalySettings(detector=detector)
    norms, fitted = fit_norms(matrix, segments, settings, roles=ROLES)

    again = score_with_norms(norms, matrix, segments)

    assert np.allclose(again.deviation.distance_z, fitted.segment_z)
    assert np.allclose(again.detector_z, fitted.detector_z)
    assert np.array_equal(again.deviation.reference, fitted.deviation.reference)
    # Out of sample, a device's p-value counts it once more among n + 1: never smaller, and at
    # most twice as large (a device alone at its rank: 2 / (n + 1) against 1 / n).
    ratio = np.exp(again.log_p - np.log(fitted.p_value))
    assert (ratio >= 1 - 1e-9).all() and (ratio <= 2 * 2001 / 2000).all()
    flagged, _ = calibrated_flags(again.log_p, settings.fdr, None)
    assert np.array_equal(flagged, fitted.is_anomaly)
    assert set(np.flatnonzero(flagged)) == set(range(8))


def test_a_device_that_fails_after_the_fit_is_flagged_and_one_that_varies_normally_is_not():
    matrix, segments = healthy_fleet(3000, seed=2)
    settings = AnomalySettings()
    norms, fitted = fit_norms(matrix, segments, settings, roles=ROLES)
    assert not fitted.is_anomaly.any()

    changed = matrix[:2].copy()
    changed[0, :3] += 10.0  # a fault in every health key
    changed[1] += np.random.default_rng(5).normal(scale=0.5, size=len(ROLES))  # ordinary drift
    scored = score_with_norms(norms, changed, segments[:2])

    fleet_log_p = np.log(fitted.p_value)
    fleet_log_p[:2] = scored.log_p
    flagged, cut = calibrated_flags(fleet_log_p, settings.fdr, None)
    assert np.flatnonzero(flagged).tolist() == [0]
    result = scored.result(flagged[:2], cut, settings)
    assert result.kind.tolist() == ["health", None]
    assert result.score[0] >= 0.5 > result.score[1]


def test_a_device_in_a_segment_the_norms_do_not_know_is_compared_with_the_nearest_large_one():
    matrix, segments = healthy_fleet(1000, seed=3)
    norms, _ = fit_norms(matrix, segments, AnomalySettings(), roles=ROLES)
    scored = score_with_norms(norms, matrix[:5], np.full(5, 99))
    assert set(scored.deviation.reference.tolist()) <= set(norms.segments.large.tolist())
    assert np.isfinite(scored.log_p).all()


@pytest.mark.parametrize("devices", [500, 50_000])
def test_the_kept_reference_gives_the_fleets_p_values_within_its_resolution(devices):
    evidence = np.random.default_rng(4).gamma(2.0, size=devices)
    reference = EvidenceReference.of(evidence, 0.9)
    assert len(reference.sorted_evidence) == min(devices, REFERENCE_POINTS)
    in_sample = log_p_values(evidence, 0.9)
    out_of_sample = reference.log_p(evidence)
    resolution = 1 / min(devices, REFERENCE_POINTS - 1)
    body = evidence <= reference.high
    assert np.allclose(np.exp(out_of_sample[body]), np.exp(in_sample[body]), atol=resolution + 1 / devices)
    # Beyond the reference quantile both follow the same tail.
    far = evidence > np.quantile(evidence, 0.999)
    assert np.allclose(out_of_sample[far], in_sample[far], atol=np.log(2))
    assert reference.log_p(np.array([evidence.max() * 3]))[0] < np.log(1 / devices)


def test_a_detector_loaded_in_a_new_process_uses_the_cached_compilation(tmp_path):
    """HBOS's scoring loop is compiled in every process unless it goes through the on-disk cache
    (seconds per run); norms loaded from the store must take the cached path too."""
    matrix, segments = healthy_fleet(500, seed=6)
    norms, _ = fit_norms(matrix, segments, AnomalySettings(detector="hbos"), roles=ROLES)
    saved = tmp_path / "norms.pickle"
    saved.write_bytes(pickle.dumps((norms, matrix[:5], segments[:5])))
    script = (
        "import pickle, sys\n"
        "from pyod.models import hbos\n"
        "from persona_pipeline.anomalies.scoring import score_with_norms\n"
        "norms, matrix, segments = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "score_with_norms(norms, matrix, segments)\n"
        "print(getattr(hbos._calculate_outlier_scores, '_disk_cached', False))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script, str(saved)], capture_output=True, text=True, check=True
    ).stdout
    assert shown.strip() == "True"


def test_changed_devices_like_the_fleet_show_no_drift_and_a_shared_new_behaviour_does():
    everyone, segments = healthy_fleet(3400, seed=7)
    norms, _ = fit_norms(everyone[:3000], segments[:3000], AnomalySettings(), roles=ROLES)
    like_the_fleet, their_segments = everyone[3000:], segments[3000:]
    calm = drift(score_with_norms(norms, like_the_fleet, their_segments).log_p)
    assert calm.devices == 400 and calm.strange <= calm.expected + 4 and calm.chance > 0.01

    moved = like_the_fleet.copy()
    moved[:40, 6] += 12.0  # a tenth of the changed devices share a new context value
    shifted = drift(score_with_norms(norms, moved, their_segments).log_p)
    assert shifted.strange >= 40 and shifted.chance < 1e-6
    assert drift(np.zeros(0)).chance == 1.0


def test_a_stratified_sample_keeps_each_segment_in_proportion_and_small_ones_whole():
    segments = np.repeat([0, 1, 2, 3], [60_000, 30_000, 3_000, 300])
    sample = stratified_sample(segments, 20_000, seed=1)
    assert np.array_equal(sample, np.sort(sample)) and len(np.unique(sample)) == len(sample)
    taken = np.bincount(segments[sample], minlength=4)
    assert taken[0] == 60_000 * 20_000 // 93_300 and taken[1] == 30_000 * 20_000 // 93_300
    assert taken[2] == 1_000 and taken[3] == 300  # at least 1,000 of a segment, or all of a smaller one
    assert np.array_equal(stratified_sample(segments, 20_000, seed=1), sample)
    assert not np.array_equal(stratified_sample(segments, 20_000, seed=2), sample)
    assert np.array_equal(stratified_sample(segments[:500], 20_000, seed=1), np.arange(500))
