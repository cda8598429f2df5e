"""Learning key weights from responses (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from persona_pipeline.feedback.learning import LearningSettings, learn_weights, unweighted

KEYS = ["signal", "battery", "city", "city"]  # city has two one-hot dimensions


def responses(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Acceptance depends on `signal` only; `battery` and `city` are noise."""
    values = rng.random((n, 4))
    values[:, 3] = 1 - values[:, 2]
    accepted = rng.random(n) < 1 / (1 + np.exp(-8 * (values[:, 0] - 0.5)))
    return values, accepted


def test_the_key_that_predicts_acceptance_gains_weight_over_rounds():
    rng = np.random.default_rng(3)
    weights = {"signal": 0.2, "battery": 0.2, "city": 0.3, "unrelated.key": 0.5}
    settings = LearningSettings(learning_rate=0.5)
    for _ in range(3):
        values, accepted = responses(rng)
        learned = learn_weights(values, accepted, np.array(["usage"] * len(values)), KEYS, weights, settings)
        weights = learned.weights
    assert weights["signal"] / weights["battery"] > 3  # started equal
    assert weights["signal"] > 0.2 > weights["battery"] >= settings.floor
    assert weights["unrelated.key"] == 0.5  # no dimension in the data: untouched
    assert set(learned.table.columns) == {"key", "old", "new", "importance"}


def test_a_few_responses_or_one_sided_answers_change_nothing():
    rng = np.random.default_rng(0)
    values, accepted = responses(rng, n=20)
    current = {"signal": 0.2, "battery": 0.2, "city": 0.3}
    assert (
        learn_weights(values, accepted, np.array(["usage"] * 20), KEYS, current, LearningSettings()).weights
        == current
    )
    values, _ = responses(rng)
    all_yes = np.ones(len(values), dtype=bool)
    same = learn_weights(
        values, all_yes, np.array(["usage"] * len(values)), KEYS, current, LearningSettings()
    )
    assert same.weights == current


def test_weights_stay_within_floor_and_ceiling_and_settings_are_checked():
    rng = np.random.default_rng(1)
    values, accepted = responses(rng, n=2000)
    settings = LearningSettings(learning_rate=1.0, floor=0.1, ceiling=0.4)
    learned = learn_weights(
        values,
        accepted,
        np.array(["usage"] * 2000),
        KEYS,
        {"signal": 0.3, "battery": 0.3, "city": 0.3},
        settings,
    )
    assert all(0.1 <= learned.weights[k] <= 0.4 for k in ("signal", "battery", "city"))
    with pytest.raises(ValueError, match="learning_rate"):
        LearningSettings(learning_rate=0)


def test_unweighted_divides_out_the_dimension_weights():
    matrix = np.array([[0.5, 0.0, 0.3]])
    assert unweighted(matrix, np.array([0.5, 0.0, 0.6])).tolist() == [[1.0, 0.0, 0.5]]
