"""Learning key weights from responses (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from persona_pipeline.feedback.learning import LearningSettings, learn_weights, unweighted
from persona_pipeline_tests.conftest import ENGINES

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


def test_a_large_batch_is_learned_from_a_sample_with_the_same_answer_share():
    rng = np.random.default_rng(5)
    values, accepted = responses(rng, n=6_000)
    weights = {"signal": 0.2, "battery": 0.2, "city": 0.3}
    triggers = np.array(["usage"] * len(values))
    whole = learn_weights(values, accepted, triggers, KEYS, weights, LearningSettings())
    sampled = learn_weights(
        values, accepted, triggers, KEYS, weights, LearningSettings(max_fit_responses=1_500)
    )
    again = learn_weights(
        values, accepted, triggers, KEYS, weights, LearningSettings(max_fit_responses=1_500)
    )
    assert sampled.weights == again.weights  # the sample is fixed
    assert sampled.weights != whole.weights  # and it is a sample
    assert sampled.weights["signal"] > 0.2 > sampled.weights["battery"]  # the same lesson
    assert sampled.responses_by_trigger == {"usage": 6_000}


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


@pytest.mark.parametrize("embedded_engine", ENGINES)
def test_learned_weights_make_lookalike_offers_accepted_more_often(tmp_path, embedded_engine):
    """The loop, measured: acceptance depends on one key (`a`) and not on six others. After
    learning from the responses to a first, random round of offers, the lookalikes Qdrant finds
    in the re-weighted space accept more often than those it finds with the initial weights."""
    from persona_pipeline.resources import VectorIndex
    from persona_pipeline.resources.vector_index import point_id

    rng = np.random.default_rng(7)
    devices = np.array([f"d{i}" for i in range(1500)], dtype=object)
    keys = ["a", "b", "c", "d", "e", "f", "g"]
    values = rng.random((len(devices), len(keys)))
    needs = 1 / (1 + np.exp(-12 * (values[:, 0] - 0.65)))  # only `a` predicts acceptance
    index = VectorIndex(path=str(tmp_path / "qdrant"), embedded_engine=embedded_engine)

    def lookalike_acceptance(weights: dict[str, float], offered: np.ndarray, accepted: np.ndarray) -> float:
        matrix = values * np.array([weights[key] for key in keys])
        name = f"personas_test-{len(weights)}-{weights['a']:.4f}"
        with index.open() as store:
            store.ensure_collection(name, len(keys))
            store.upsert(
                name, [point_id(d) for d in devices], matrix, [{"device_id": d} for d in devices], 500
            )
            found = store.recommend(
                name,
                [point_id(d) for d in devices[offered][accepted]],
                [point_id(d) for d in devices[offered][~accepted]],
                limit=100,
                exclude={"device_id": devices[offered].tolist()},
            )
        chosen = np.isin(devices, [hit.payload["device_id"] for hit in found])
        return float(needs[chosen].mean())

    initial = dict.fromkeys(keys, 0.5)
    offered = rng.choice(len(devices), size=300, replace=False)
    accepted = rng.random(300) < needs[offered]
    before = lookalike_acceptance(initial, offered, accepted)

    weights = initial
    for _ in range(3):  # a few feedback rounds on the same responses
        learned = learn_weights(
            values[offered],
            accepted,
            np.array(["lookalike"] * 300),
            keys,
            weights,
            LearningSettings(),
        )
        weights = learned.weights
    after = lookalike_acceptance(weights, offered, accepted)

    assert all(weights["a"] / weights[key] > 1.5 for key in keys[1:])
    assert after > before + 0.05, (before, after)


def test_the_use_of_the_app_an_offer_is_about_is_learned_as_the_strongest_predictor():
    """Tutorials for three apps, each taken by heavy users of its own app (80%); owners of some
    models take any offer more often (40% against 5%). Pooled over the offers, each app's column
    predicts only a third of them and the model looks stronger; the offered app's use is not."""
    rng = np.random.default_rng(5)
    n = 1200
    values = rng.random((n, 5))  # maps, music, games use; connection (noise); model
    offered = rng.integers(0, 3, n)
    heavy = values[np.arange(n), offered] > 0.7
    accepted = rng.random(n) < np.where(heavy, 0.8, np.where(values[:, 4] > 0.5, 0.4, 0.05))
    keys = ["maps", "music", "games", "connection", "model"]
    current = dict.fromkeys(keys, 0.5)
    triggers = np.array(["usage"] * n)
    settings = LearningSettings(learning_rate=1.0)
    pooled = learn_weights(values, accepted, triggers, keys, current, settings).weights
    aware = learn_weights(
        values, accepted, triggers, keys, current, settings, offered_dimension=offered
    ).weights
    assert min(aware[app] for app in keys[:3]) > aware["model"] > 0.5 * aware["maps"] > aware["connection"]
    assert pooled["model"] > min(pooled[app] for app in keys[:3])
    assert aware["connection"] == settings.floor  # L1: no evidence, so it decays to the floor
