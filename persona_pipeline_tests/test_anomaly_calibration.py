"""Calibrated anomaly flags: a flag is evidence at a stated false-discovery rate, whatever the fleet,
and carries the role of the keys that drove it (health, behaviour, context)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_pipeline.anomalies.evaluation import flag_quality
from persona_pipeline.anomalies.scoring import (
    AnomalySettings,
    calibrated_flags,
    log_p_values,
    robust_spread,
    score_anomalies,
)
from persona_pipeline.app.evaluate import FLAG_TARGETS, HEALTHY_MAX_FLAGGED, evaluate_demo_fleet
from persona_pipeline_tests import conftest
from persona_pipeline_tests.conftest import ENV_VARIABLES, resources_for, table


def fleet_run(home, devices: int, seed: int, keep):
    """A generated fleet (7 days), only the devices `keep` selects, through every asset."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ENV_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("PERSONA_HOME", str(home))
        db_url = None if conftest.STORE_BACKEND == "sqlite" else conftest.store_url(home)
        return evaluate_demo_fleet(devices=devices, days=7, seed=seed, home=home, db_url=db_url, keep=keep)


def test_a_fleet_where_nothing_is_broken_gets_no_health_flag_and_at_most_half_a_percent(tmp_path):
    # Every movers and heavy user of the generator stays (about 4 % and 5 %); no device fails.
    run = fleet_run(tmp_path, devices=2000, seed=11, keep=lambda truth: ~truth["failing"])
    assert run.planted == 0 and run.devices > 1900
    assert run.flagged <= HEALTHY_MAX_FLAGGED * run.devices
    scores = table(resources_for(tmp_path)["persona_store"], "anomaly_scores")
    flagged = scores[scores["is_anomaly"].astype(bool)]
    assert "health" not in set(flagged["kind"])
    assert scores.loc[~scores["is_anomaly"].astype(bool), "kind"].isna().all()
    assert scores["p_value"].between(0, 1).all() and (scores["score"] < 0.5).sum() >= len(scores) - len(
        flagged
    )


def test_a_fleet_with_many_failing_devices_is_flagged_with_recall_and_precision(tmp_path):
    # All failing devices of a 4,000-device fleet and a third of the others: about 5 % failing.
    run = fleet_run(
        tmp_path, devices=4000, seed=13, keep=lambda truth: truth["failing"] | (truth.index % 3 == 0)
    )
    assert run.planted / run.devices > 0.04
    assert run.flag_recall >= FLAG_TARGETS["recall"] and run.flag_precision >= FLAG_TARGETS["precision"]
    scores = table(resources_for(tmp_path)["persona_store"], "anomaly_scores").set_index("device_id")
    truth = pd.read_csv(tmp_path / "ground_truth" / "devices.csv").set_index("device_id")
    failing = scores[truth["failing"].reindex(scores.index).fillna(False).astype(bool)]
    found = failing[failing["is_anomaly"].astype(bool)]
    assert (found["kind"] == "health").all()
    assert found["reason"].str.contains(r"crashes|battery drain|signal").all()
    assert (found["score"] >= 0.5).all() and (found["p_value"] <= AnomalySettings().fdr).all()


def null_fleet(seed: int, devices: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nothing broken: Gaussian health and behaviour, a binary context flag held by 3 %."""
    rng = np.random.default_rng(seed)
    matrix = np.column_stack(
        [
            rng.normal(0.5, 0.05, (devices, 3)),
            rng.normal(0.3, 0.1, (devices, 4)),
            (rng.random(devices) < 0.03).astype(float),
        ]
    )
    roles = np.array(["health"] * 3 + ["behaviour"] * 4 + ["context"], dtype=object)
    return matrix, np.zeros(devices, dtype=np.int64), roles


def test_on_null_fleets_flags_are_rare_and_a_zero_spread_binary_does_not_blow_up():
    fleets_with_a_flag = 0
    for seed in range(10):
        matrix, segments, roles = null_fleet(seed)
        result = score_anomalies(matrix, segments, AnomalySettings(fdr=0.05), roles=roles)
        fleets_with_a_flag += bool(result.is_anomaly.any())
        holders = matrix[:, -1] == 1
        # The 3 % that hold the binary value are unusual, not evidence: their p-value stays large.
        assert result.role_log_p["context"][holders].min() > np.log(0.01)
    # BH at 5 % on a fleet where nothing deviates: any flag in at most ~5 % of fleets.
    assert fleets_with_a_flag <= 1
    spread = robust_spread(np.r_[np.zeros(98), [1.0, 1.0]][:, None])  # MAD 0: the 1st-99th range instead
    assert spread[0] > 0.1


def test_the_kind_is_the_role_that_drove_the_flag_and_a_move_is_never_health():
    matrix, segments, roles = null_fleet(0)
    matrix[:10, 0:3] = 0.95  # ten failing devices: health far off
    matrix[10:20, 3] = 1.5  # ten devices with a sudden surge of one app: behaviour far off
    result = score_anomalies(matrix, segments, AnomalySettings(), roles=roles)
    assert result.is_anomaly[:20].all() and result.is_anomaly[20:].sum() <= 2
    assert (result.kind[:10] == "health").all() and (result.kind[10:20] == "behaviour").all()
    assert all(kind is None for kind in result.kind[~result.is_anomaly])
    assert np.array_equal(result.is_anomaly, result.score >= 0.5)


def test_benjamini_hochberg_flags_follow_the_evidence_not_a_share():
    log_p = np.log(np.r_[[1e-6, 2e-6, 0.004], np.linspace(0.05, 1, 97)])
    flagged, cut = calibrated_flags(log_p, fdr=0.05, contamination=None)
    assert flagged.tolist()[:4] == [True, True, False, False] and flagged.sum() == 2
    assert cut == pytest.approx(np.log(2e-6))
    none, cut = calibrated_flags(np.log(np.linspace(0.01, 1, 100)), fdr=0.05, contamination=None)
    assert not none.any() and cut == pytest.approx(np.log(0.05 / 100))
    share, _ = calibrated_flags(log_p, fdr=0.05, contamination=0.1)
    assert share.sum() == 10
    # A device is not its own reference: alone at the top of 100, its rank p-value is 1 / 100.
    assert np.exp(log_p_values(np.r_[np.zeros(99), 1.0], 0.9)).max() == 1.0
    assert np.exp(log_p_values(np.arange(10.0), 0.9)).min() == pytest.approx(0.1)


def test_settings_refuse_a_false_discovery_rate_or_reference_outside_their_range():
    with pytest.raises(ValueError, match="fdr"):
        AnomalySettings(fdr=1.5)
    with pytest.raises(ValueError, match="reference_quantile"):
        AnomalySettings(reference_quantile=0.3)
    assert flag_quality(np.array([True, False]), np.array([True, True]))["precision"] == 0.5
