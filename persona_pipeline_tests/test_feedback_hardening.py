"""Feedback hardening: weights refresh bookkeeping, held feedback for offers not made yet,
implausible response times, the latest answer counts, and bad batch ids."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from persona_pipeline.feedback.assets import key_weights, offer_feedback
from persona_pipeline.partitions import offer_feedback_batches
from persona_pipeline.resources import PersonaStore
from persona_pipeline.store.tables import offer_feedback_held, service_recommendations
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
    return result.asset_materializations_for_node("key_weights")[0].metadata["decision"].value


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


@pytest.mark.store_agnostic
@pytest.mark.parametrize("batch_id", ["../../x", "", "a/b", ".hidden", "..", "ok/../../x"])
def test_a_simulated_batch_with_an_unsafe_id_is_refused_and_nothing_is_written(tmp_path, batch_id):
    from persona_pipeline.demo.responses import write_feedback_batch

    landing = tmp_path / "home" / "landing"
    responses = pd.DataFrame([answer("o1", "accepted")])
    with pytest.raises(ValueError, match=r"^batch id .*") as raised:
        write_feedback_batch(responses, landing, batch_id)
    assert "\n" not in str(raised.value)
    assert not any(path.is_file() for path in tmp_path.rglob("*"))

    folder = write_feedback_batch(responses, landing, "sim-2026-03-07-1")
    assert folder == landing / "offer_feedback" / "batch=sim-2026-03-07-1"
    assert (folder / "_SUCCESS").is_file()


@pytest.mark.store_agnostic
def test_the_sensor_names_a_bad_batch_folder_once_and_requests_the_good_ones(tmp_path, capsys):
    """`offer_feedback/batch=` with `_SUCCESS` became a partition with an empty key, and every run
    failed with "Cannot access partition_key for a non-partitioned run", naming no folder."""
    from persona_pipeline.feedback.sensors import offer_feedback_sensor
    from persona_pipeline.resources import LandingZone

    home = tmp_path / "home"
    write_batch(home, "", [answer("o1", "accepted")])
    write_batch(home, "good-1", [answer("o1", "accepted")])
    landing = {
        "landing_zone": LandingZone(path=str(home / "landing")),
        "persona_store": PersonaStore(url=f"sqlite:///{tmp_path / 'persona.db'}"),
    }

    def warnings() -> list[str]:  # the sensor context logs to stderr
        return [
            line for line in capsys.readouterr().err.splitlines() if "WARNING" in line and "batch=" in line
        ]

    with dg.instance_for_test() as instance:
        first = offer_feedback_sensor(dg.build_sensor_context(instance=instance, resources=landing))
        assert [(r.partition_key, r.run_key) for r in first.run_requests] == [("good-1", "good-1")]
        (added,) = first.dynamic_partitions_requests
        assert added.partition_keys == ["good-1"]
        (warning,) = warnings()
        assert "offer_feedback/batch=: batch id '' is empty" in warning

        write_batch(home, "good-2", [answer("o2", "rejected")])
        second = offer_feedback_sensor(
            dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=landing)
        )
        assert [r.run_key for r in second.run_requests] == ["good-2"]
        assert warnings() == []  # reported once

        # A cursor written before (the list of batches seen) still reads.
        old = offer_feedback_sensor(
            dg.build_sensor_context(instance=instance, cursor=json.dumps(["good-1"]), resources=landing)
        )
        assert [r.run_key for r in old.run_requests] == ["good-2"]


def feedback_sensor_tick(resources: dict, instance: dg.DagsterInstance, cursor: str | None = None):
    from persona_pipeline.feedback.sensors import offer_feedback_sensor

    wanted = {name: resources[name] for name in ("landing_zone", "persona_store")}
    return offer_feedback_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=wanted))


def test_feedback_that_arrives_before_its_offers_is_held_then_loaded_and_learned(persona_home, instance):
    """A batch answering offers that are not in the store yet: those rows were rejected for good
    and the batch never read again. Now they are held; once the offers exist, the next run (the
    sensor asks for one after new offers) makes them responses of their batch, and the weights
    refresh learns that batch again. Rows whose offer never comes are rejected when the hold ends."""
    resources = resources_for(persona_home)
    store = resources["persona_store"]
    make_offers(store, ["o1"])
    write_batch(
        persona_home, "early", [answer("o1", "accepted"), answer("o2", "used"), answer("never", "accepted")]
    )
    metadata = load("early", resources, instance)
    assert (metadata["responses"].value, metadata["held"].value, metadata["rejected"].value) == (1, 2, 0)
    held = table(store, "offer_feedback_held", order_by=["source_row"])
    assert held[["batch_id", "source_row", "offer_id", "response"]].values.tolist() == [
        ["early", 2, "o2", "used"],
        ["early", 3, "never", "accepted"],
    ]
    first_seen = held["first_seen_at"].iloc[0]
    assert refresh(resources, instance) == "none: nothing changed"

    # Re-processing the batch keeps when its rows were first seen.
    load("early", resources, instance)
    assert table(store, "offer_feedback_held")["first_seen_at"].tolist() == [first_seen, first_seen]
    assert refresh(resources, instance) == "none: nothing changed"  # learned again: a new load

    # The offers are made; the sensor asks for the held batch once, after the new offers.
    make_offers(store, ["o2"])
    instance.report_runless_asset_event(dg.AssetMaterialization("service_recommendations"))
    seen = json.dumps(["early"])
    ticked = feedback_sensor_tick(resources, instance, seen)
    assert [r.partition_key for r in ticked.run_requests] == ["early"]

    # Any feedback run retries the held rows of every batch: here a new batch's.
    write_batch(persona_home, "later", [answer("o1", "rejected", at=f"{OFFER_DAY}T16:00:00Z")])
    metadata = load("later", resources, instance)
    assert metadata["held_rows_now_responses"].value == 1
    feedback = table(store, "offer_feedback", order_by=["batch_id", "offer_id"])
    assert feedback[["batch_id", "offer_id", "response"]].values.tolist() == [
        ["early", "o1", "accepted"],
        ["early", "o2", "used"],
        ["later", "o1", "rejected"],
    ]
    assert table(store, "offer_feedback_held")["offer_id"].tolist() == ["never"]
    assert refresh(resources, instance) == "none: nothing changed"
    learned = json.loads(table(store, "key_weight_refreshes").sort_values("refresh_id")["batches"].iloc[-1])
    assert learned == ["early", "later"]  # the late rows' batch is learned again
    assert not feedback_sensor_tick(resources, instance, json.dumps(["early", "later"])).run_requests

    # The hold ends: the last held row becomes a reject of its batch, with the reason.
    with store.begin() as connection:
        now = pd.Timestamp.now(tz="UTC")
        connection.execute(
            offer_feedback_held.update().values(
                first_seen_at=(now - pd.Timedelta(days=3)).to_pydatetime(), hold_until=now.to_pydatetime()
            )
        )
    (expired,) = feedback_sensor_tick(resources, instance, json.dumps(["early", "later"])).run_requests
    assert expired.partition_key == "early" and "hold-ended" in expired.run_key
    load("early", resources, instance)
    assert table(store, "offer_feedback_held").empty
    (reject,) = table(store, "offer_feedback_rejects").itertuples()
    assert (reject.batch_id, reject.source_row, reject.reason_code) == ("early", 3, "unknown_offer")
    assert reject.reason == "offer_id 'never' names no offer that was made (held 3 days)"
    load("early", resources, instance)  # processed again: still rejected, not held anew
    assert table(store, "offer_feedback_held").empty
    assert table(store, "offer_feedback_rejects")["reason_code"].tolist() == ["unknown_offer"]


def test_responses_from_the_future_or_from_before_the_offer_are_rejected_with_reasons(persona_home, instance):
    resources = resources_for(persona_home)
    store = resources["persona_store"]
    make_offers(store, ["o1", "o2", "o3"])
    soon = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_batch(
        persona_home,
        "times",
        [
            answer("o1", "accepted", at="2099-01-01T00:00:00Z"),
            answer("o2", "accepted", at="2026-03-06T23:59:00Z"),  # the day before the offer
            answer("o3", "accepted", at=soon),  # within the clock skew allowed
        ],
    )
    metadata = load("times", resources, instance)
    assert (metadata["responses"].value, metadata["rejected"].value) == (1, 2)
    assert table(store, "offer_feedback")["offer_id"].tolist() == ["o3"]
    rejects = table(store, "offer_feedback_rejects").set_index("source_row")
    assert rejects["reason_code"].to_dict() == {1: "future_response", 2: "before_offer"}
    assert rejects.loc[1, "reason"].startswith(
        "responded_at '2099-01-01T00:00:00Z' is in the future (later than "
    )
    assert rejects.loc[2, "reason"] == (
        f"responded_at '2026-03-06T23:59:00Z' is before offer 'o2' was made (day {OFFER_DAY})"
    )


def test_an_offer_answered_several_times_counts_by_its_latest_answer(persona_home, instance):
    """Accepted, then rejected, then dismissed (over two batches): the offer is not accepted, for
    the learning and for the acceptance figures; answered the other way round, it is."""
    from persona_pipeline.feedback.storage import acceptance_by_weights_version, read_responded_offers
    from persona_pipeline.offers.storage import read_acceptance

    resources = resources_for(persona_home)
    store = resources["persona_store"]
    make_offers(store, ["o1", "o2"])
    write_batch(
        persona_home,
        "first",
        [
            answer("o1", "accepted", at=f"{OFFER_DAY}T10:00:00Z"),
            answer("o1", "rejected", at=f"{OFFER_DAY}T11:00:00Z"),
            answer("o2", "rejected", at=f"{OFFER_DAY}T10:00:00Z"),
        ],
    )
    write_batch(
        persona_home,
        "second",
        [
            answer("o1", "dismissed", at=f"{OFFER_DAY}T12:00:00Z"),
            answer("o2", "used", at=f"{OFFER_DAY}T12:00:00Z"),
        ],
    )
    first = load("first", resources, instance)
    assert first["acceptance_rate"].value == 0.0  # in this batch, o1 was last rejected
    load("second", resources, instance)

    responded = read_responded_offers(store).set_index("offer_id")["accepted"]
    assert responded.to_dict() == {"o1": False, "o2": True}
    history = acceptance_by_weights_version(store).iloc[0]
    assert (history["answered"], history["accepted"]) == (2, 1)
    acceptance = read_acceptance(store).iloc[0]
    assert (acceptance["accepted"], acceptance["responses"]) == (1, 2)


@pytest.mark.store_agnostic
def test_the_sensors_leave_alone_what_the_command_line_already_did(tmp_path):
    """A daemon started after `persona-pipeline run` has no cursor: it loaded every batch again and
    rebuilt the vectors for weights the command line had already used."""
    from persona_pipeline.feedback.sensors import key_weights_sensor, offer_feedback_sensor
    from persona_pipeline.resources import LandingZone

    home = tmp_path / "home"
    write_batch(home, "done-1", [answer("o1", "accepted")])
    write_batch(home, "new-2", [answer("o2", "accepted")])
    resources = {
        "landing_zone": LandingZone(path=str(home / "landing")),
        "persona_store": PersonaStore(url=f"sqlite:///{tmp_path / 'persona.db'}"),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("offer_feedback_batches", ["done-1"])
        instance.report_runless_asset_event(dg.AssetMaterialization("offer_feedback", partition="done-1"))
        tick = offer_feedback_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.partition_key for r in tick.run_requests] == ["new-2"]

        instance.report_runless_asset_event(
            dg.AssetMaterialization("key_weights", metadata={"live_version_changed": True})
        )
        instance.report_runless_asset_event(dg.AssetMaterialization("persona_vectors"))
        quiet = key_weights_sensor(dg.build_sensor_context(instance=instance))
        assert not quiet.run_requests and quiet.cursor
        instance.report_runless_asset_event(
            dg.AssetMaterialization("key_weights", metadata={"live_version_changed": True})
        )
        assert len(key_weights_sensor(dg.build_sensor_context(instance=instance)).run_requests) == 1
