"""The demo's whole loop through Dagster, and the learning it shows, measured on the same day."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_pipeline.demo.responses import acceptance_probability
from persona_pipeline.service_catalog import load_service_catalog
from persona_pipeline_tests.conftest import resources_for, table


def test_the_response_model_judges_each_offer_by_the_need_its_service_serves():
    truth = pd.DataFrame(
        {
            "device_id": ["mover", "maps_fan", "failing", "plain", "iphone"],
            "moved": [True, False, False, False, False],
            "heavy_app": [None, "maps", None, None, None],
            "failing": [False, False, True, False, False],
            "model": ["Moto G", "Moto G", "Moto G", "Moto G", "iPhone 15"],
        }
    )
    offers = pd.DataFrame(
        [
            ("mover", "regional_services", "location"),
            ("mover", "localized_support_docs", "lookalike"),
            ("maps_fan", "app_tutorial:maps", "usage"),
            ("maps_fan", "car_mount", "lookalike"),  # a fixed-id service for maps users
            ("maps_fan", "app_tutorial:music", "usage"),
            ("failing", "diagnostics_tool", "lookalike"),
            ("plain", "diagnostics_tool", "support"),
            ("iphone", "app_tutorial:news", "usage"),
        ],
        columns=["device_id", "service_id", "trigger"],
    )
    chance = acceptance_probability(offers, truth, load_service_catalog())
    assert np.allclose(chance, [0.75, 0.75, 0.75, 0.75, 0.05, 0.75, 0.05, 0.4])


@pytest.mark.sqlite_only(reason="the same-day comparison copies the embedded SQLite file and Qdrant path")
def test_the_demo_loop_learns_weights_that_make_better_offers(persona_home, instance):
    from persona_pipeline.app.demo_loop import compare_weights, comparison_report, run_demo
    from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing

    fleet = generate_fleet(3000, 5, seed=7, start="2026-03-01")
    write_landing(fleet, persona_home / "landing")
    write_ground_truth(fleet, persona_home / "ground_truth")
    said: list[str] = []
    result = run_demo(rounds=2, seed=11, say=said.append, instance=instance)
    assert result.feedback_batches == ["sim-2026-03-03-1", "sim-2026-03-04-2"]
    assert said[0] == "round 0: days 2026-03-01 … 2026-03-03 with the initial weights"
    # No step is silent: each job of each round says when it is done and how long it took.
    done = [line.split()[0] for line in said if " done in " in line]
    assert done[:3] == ["ingest_job", "personas_job", "segments_job"]
    assert done.count("weights_job") == 2 and len(done) == 3 + 2 * 5, said

    store = resources_for(persona_home)["persona_store"]
    weights = table(store, "key_weights")
    offers_before = table(store, "service_recommendations")
    assert weights.groupby("version")["source"].first().tolist() == ["config", "feedback", "feedback"]

    # Each refresh made a candidate and the gate decided on it; the live version is the newest accepted.
    decisions = table(store, "key_weight_refreshes").sort_values("candidate_version")
    assert decisions["candidate_version"].tolist() == [2, 3]
    assert decisions["decision"].iloc[-1] == "accepted", decisions["reason"].tolist()
    comparison = compare_weights(instance)
    rates = comparison.table.set_index("trigger")
    assert comparison.day == "2026-03-05"
    assert (comparison.initial_version, comparison.learned_version) == (1, 3)
    # Acceptance depends on the model (owners of two models take unneeded offers) and not on
    # the connection type: the first key's weight rose relative to the second.
    learned = comparison.weight_changes.set_index("key")
    ratio = learned.loc["device.model"] / learned.loc["device.connection.type"]
    assert ratio["learned"] > 2 * ratio["initial"], learned
    # The same day's offers, from the same state, are accepted more often with the learned weights,
    # through the lookalikes. Heavy use is judged against usage peers the weights do not move, so
    # the learned weights cannot multiply usage offers (they did when heavy use followed segments).
    assert rates.loc["all", "acceptance_learned"] > rates.loc["all", "acceptance_initial"] + 0.03, rates
    assert rates.loc["lookalike", "acceptance_learned"] > rates.loc["lookalike", "acceptance_initial"], rates
    assert rates.loc["usage", "offers_learned"] <= 1.2 * rates.loc["usage", "offers_initial"], rates
    # Rule-triggered location offers do not depend on the weights.
    assert rates.loc["location", "offers_initial"] == rates.loc["location", "offers_learned"]
    report = comparison_report(comparison)
    assert "initial weights" in report and "device.model" in report

    # The comparison works on copies: the home's own offers and weights are untouched.
    assert table(store, "key_weights")["version"].max() == 3
    assert table(store, "service_recommendations")["offer_id"].tolist() == offers_before["offer_id"].tolist()
