"""Feedback hardening: weights refresh bookkeeping, held feedback for offers not made yet,
implausible response times, the latest answer counts, and bad batch ids."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from persona_pipeline.feedback.assets import key_weights, offer_feedback, offer_feedback_batches
from persona_pipeline.resources import PersonaStore
from persona_pipeline.store.tables import service_recommendations
from persona_pipeline_tests.conftest import resources_for, table

OFFER_DAY = "2026-03-07"


def make_offers(store: PersonaStore, offer_ids: list[str], day: str = OFFER_DAY, **columns) -> None:
    """Offers as service_recommendations holds them (no persona vector: nothing to learn from)."""
    frame = pd.DataFrame(
        {
            "offer_id": offer_ids,
            "device_id": [f"dev-{offer_id}" for offer_id in offer_ids],
            "service_id": "diagnostics",
            "trigger": "support",
            "score": 0.5,
            "reason": "test offer",
            "created_at": pd.Timestamp(f"{day}T12:00:00Z"),
            "offer_day": day,
            "priority": 1.0,
            "weights_version": 1,
            **columns,
        }
    )
    with store.begin() as connection:
        store.insert_frame(connection, service_recommendations, frame)


def write_batch(home: Path, batch: str, records: list[dict]) -> Path:
    folder = home / "landing" / "offer_feedback" / f"batch={batch}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (folder / "_SUCCESS").touch()
    return folder


def answer(offer_id: str, response: str, at: str = f"{OFFER_DAY}T15:00:00Z") -> dict:
    return {"offer_id": offer_id, "response": response, "responded_at": at}


def load(batch: str, resources: dict, instance: dg.DagsterInstance, config: dict | None = None):
    instance.add_dynamic_partitions(offer_feedback_batches.name, [batch])
    run_config = {"ops": {"offer_feedback": {"config": config}}} if config else None
    result = dg.materialize(
        [offer_feedback], partition_key=batch, resources=resources, instance=instance, run_config=run_config
    )
    assert result.success
    return result.asset_materializations_for_node("offer_feedback")[0].metadata


def refresh(resources: dict, instance: dg.DagsterInstance) -> str:
    result = dg.materialize([key_weights], resources=resources, instance=instance)
    assert result.success
    return result.asset_materializations_for_node("key_weights")[0].metadata["new_version"].value


def test_any_number_of_refreshes_that_change_nothing_are_recorded(persona_home, instance):
    """Two batches too small to learn from: each refresh keeps the weights version in use and is
    recorded (the second one failed on the refreshes' primary key); a re-run records nothing."""
    resources = resources_for(persona_home)
    store = resources["persona_store"]
    make_offers(store, ["o1", "o2", "o3"])
    write_batch(persona_home, "b1", [answer("o1", "accepted")])
    write_batch(persona_home, "b2", [answer("o2", "rejected")])

    load("b1", resources, instance)
    assert refresh(resources, instance) == "none: nothing changed"
    load("b2", resources, instance)
    assert refresh(resources, instance) == "none: nothing changed"
    assert refresh(resources, instance) == "none: no new feedback"

    refreshes = table(store, "key_weight_refreshes").sort_values("created_at")
    assert refreshes["version"].tolist() == [1, 1]
    assert [json.loads(batches) for batches in refreshes["batches"]] == [["b1"], ["b2"]]
    assert table(store, "key_weights")["version"].unique().tolist() == [1]
