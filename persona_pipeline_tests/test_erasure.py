"""A right-to-be-forgotten request leaves nothing of its devices in any store, and they stay out."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from persona_pipeline.erasure.jobs import erase_devices_job
from persona_pipeline.erasure.storage import DEVICE_TABLES
from persona_pipeline.erasure.subjects import Suppression, hash_texts, unique_ids
from persona_pipeline.personas.storage import count_erasures
from persona_pipeline.resources.vector_index import persona_collections, point_id
from persona_pipeline.store import tables
from persona_pipeline_tests.conftest import resources_for, table

DAYS = ("2026-03-01", "2026-03-04")


def erase(resources, instance, devices=(), customers=(), raise_on_error=True) -> dg.ExecuteInProcessResult:
    config = {"device_ids": list(devices), "customer_ids": list(customers), "requested_by": "case-4711"}
    return erase_devices_job.execute_in_process(
        run_config={"ops": {"erase_devices": {"config": config}}},
        resources={k: resources[k] for k in ("persona_store", "vector_index")},
        instance=instance,
        raise_on_error=raise_on_error,
    )


def stored_rows_of(resources, devices: set[str], offer_ids: set[str]) -> dict[str, int]:
    """Rows anywhere in the persona store that belong to `devices` (by id or in raw text)."""
    store = resources["persona_store"]
    found = {}
    for t in DEVICE_TABLES:
        found[t.name] = int(table(store, t.name)["device_id"].isin(devices).sum())
    found["offer_feedback"] = int(table(store, "offer_feedback")["offer_id"].isin(offer_ids).sum())
    found["offer_feedback_held"] = int(table(store, "offer_feedback_held")["offer_id"].isin(offer_ids).sum())
    for name in ("index_update_rejects", "offer_feedback_rejects"):
        raw = table(store, name)["raw"]
        found[f"{name}.raw"] = int(sum(raw.str.contains(v, regex=False).sum() for v in devices | offer_ids))
    found["update_history"] = history_rows_of(Path(store.history.root), devices)
    return found


def history_rows_of(root: Path, devices: set[str]) -> int:
    """Rows of `devices` in any Parquet file under the update history's root, read file by file
    (not through the history's own reader): a row left in any file counts."""
    files = sorted(root.rglob("*.parquet"))
    assert files, f"no update history under {root}"
    return sum(
        int(pq.read_table(path, columns=["device_id"]).column("device_id").to_pandas().isin(devices).sum())
        for path in files
    )


def points_of(resources, devices: set[str]) -> int:
    """Points of `devices` in every persona collection, by point id and by payload."""
    with resources["vector_index"].open() as index:
        collections = persona_collections(index)
        assert len(collections) >= 2  # the config weights' space and the learned one
        return sum(
            len(index.retrieve(c, [point_id(d) for d in devices]))
            + sum(p.payload.get("device_id") in devices for p in index.scroll(c))
            for c in collections
        )


@pytest.fixture
def fleet_with_feedback(persona_home, instance):
    from persona_pipeline.app.runner import run_chain, simulate_feedback
    from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing

    fleet = generate_fleet(300, 4, seed=8, start=DAYS[0])
    write_landing(fleet, persona_home / "landing")
    write_ground_truth(fleet, persona_home / "ground_truth")
    from persona_pipeline.personas.weights import current_weights, insert_weights

    run_chain(DAYS[0], "2026-03-03", instance=instance)
    resources = resources_for(persona_home)
    # A learned version that went live (whatever the gate makes of this small fleet's answers),
    # so the next run's vectors fill a second collection beside the configured weights' one.
    store = resources["persona_store"]
    live = current_weights(store)
    insert_weights(store, live.version + 1, {key: w * 1.1 for key, w in live.weights.items()}, "feedback")
    simulate_feedback(seed=2, batch_id=None)
    run_chain(None, None, instance=instance)
    return resources


def test_erased_devices_are_gone_from_every_store_and_reingest_does_not_bring_them_back(
    fleet_with_feedback, instance
):
    from persona_pipeline.app.runner import run_chain

    resources = fleet_with_feedback
    store = resources["persona_store"]
    offers = table(store, "service_recommendations")
    feedback = table(store, "offer_feedback").merge(offers[["offer_id", "device_id"]], on="offer_id")
    tickets = table(store, "support_tickets")
    rejects = table(store, "index_update_rejects")
    with_everything = sorted(set(feedback["device_id"]) & set(tickets["device_id"]))
    assert with_everything, "the fleet should have a device with a ticket and answered offers"
    rejected = sorted(set(rejects["device_id"].dropna()) - set(with_everything))
    profiles = table(store, "device_profiles")
    customer = profiles.loc[
        ~profiles["device_id"].isin([with_everything[0], rejected[0]]), "customer_id"
    ].iloc[0]
    customer_devices = set(profiles.loc[profiles["customer_id"] == customer, "device_id"])
    erased = {with_everything[0], rejected[0], *customer_devices}
    their_offers = set(offers.loc[offers["device_id"].isin(erased), "offer_id"])
    # A response held for an offer that did not exist yet when its batch was read.
    now = pd.Timestamp.now(tz="UTC")
    with store.engine.begin() as connection:
        connection.execute(
            tables.offer_feedback_held.insert(),
            [
                {
                    "batch_id": "late-1",
                    "source_file": "offer_feedback/batch=late-1/part-0.jsonl",
                    "source_row": 1,
                    "offer_id": sorted(their_offers)[0],
                    "response": "accepted",
                    "responded_at": now.isoformat(),
                    "raw": "{}",
                    "first_seen_at": now.to_pydatetime(),
                    "hold_until": (now + pd.Timedelta(days=3)).to_pydatetime(),
                }
            ],
        )
    before = stored_rows_of(resources, erased, their_offers)
    assert before["offer_feedback_held"] == 1
    assert before["support_tickets"] and before["offer_feedback"] and before["index_update_rejects"]
    assert before["update_history"]
    assert points_of(resources, erased) > 0
    devices_before = profiles["device_id"].nunique()

    assert len(table(store, "anomaly_norms")) == 1

    result = erase(resources, instance, devices=[with_everything[0], rejected[0]], customers=[customer])
    assert result.success
    assert set(stored_rows_of(resources, erased, their_offers).values()) == {0}
    assert table(store, "anomaly_norms").empty  # fitted with their vectors: fitted anew next run
    assert points_of(resources, erased) == 0
    assert table(store, "device_profiles")["device_id"].nunique() == devices_before - len(erased)

    audit = table(store, "erasure_requests")
    assert len(audit) == 1
    row = audit.iloc[0]
    assert (row["requested_by"], row["devices_erased"], row["customer_ids_requested"]) == (
        "case-4711",
        len(erased),
        1,
    )
    assert row["rows_deleted"] == (
        sum(before[t.name] for t in DEVICE_TABLES)
        + before["offer_feedback"]
        + before["offer_feedback_held"]
        + before["update_history"]
    )
    assert row["points_deleted"] > 0
    audit_text = audit.astype(str).to_json() + table(store, "suppressed_subjects").astype(str).to_json()
    assert not any(value in audit_text for value in erased | {customer})  # counts and hashes, no ids
    logged = " ".join(
        str(event.dagster_event.event_specific_data if event.dagster_event else "") + event.message
        for event in instance.all_logs(result.run_id)
    )
    assert not any(value in logged for value in erased | {customer})

    # The same landing files ingested again (every day, the whole chain): nothing comes back.
    rerun = run_chain(*DAYS, instance=instance)
    assert rerun.run_ids
    assert set(stored_rows_of(resources, erased, their_offers).values()) == {0}
    assert points_of(resources, erased) == 0
    ingest_runs = instance.get_runs(dg.RunsFilter(job_name="ingest_job"))
    ingested = instance.get_latest_materialization_event(dg.AssetKey("index_updates"))
    assert ingest_runs and ingested.asset_materialization.metadata["suppressed_rows"].value > 0

    again = erase(resources, instance, devices=[with_everything[0]])
    assert again.success
    second = table(store, "erasure_requests").set_index("request_id").loc[again.run_id.replace("-", "")]
    assert (second["rows_deleted"], second["points_deleted"]) == (0, 0)


def test_suppression_matches_devices_and_customers_by_hash_only():
    listed = Suppression.from_texts(hash_texts(["dev-1"]), hash_texts(["cust-9"]))
    frame = pd.DataFrame(
        {"device_id": ["dev-1", "dev-2", "dev-3", "dev-10"], "customer_id": [None, "cust-9", "cust-1", None]}
    )
    assert listed.matches(frame).tolist() == [True, True, False, False]
    assert not Suppression().matches(frame).any()
    assert hash_texts(["dev-1"]) == hash_texts(["dev-1"]) and len(hash_texts(["dev-1"])[0]) == 16
    with pytest.raises(ValueError, match="device_ids: an empty id"):
        unique_ids(["dev-1", " "], "device_ids")


def test_an_erasure_request_names_ids_as_ingest_stores_them():
    """Ingest stores ids in Unicode NFC; a request typed with a decomposed é must reach them."""
    decomposed, composed = "caf\u0065\u0301-7", "caf\u00e9-7"
    assert unique_ids([decomposed, composed], "device_ids") == [composed]


def test_a_request_without_ids_is_refused(persona_home, instance):
    result = erase_devices_job.execute_in_process(
        run_config={"ops": {"erase_devices": {"config": {"requested_by": "case-1"}}}},
        resources={
            k: v for k, v in resources_for(persona_home).items() if k in ("persona_store", "vector_index")
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("erase_devices")
    assert "give at least one of device_ids or customer_ids" in failure.error.message
    store = resources_for(persona_home)["persona_store"]
    assert store.scalar(sa.select(sa.func.count()).select_from(sa.table("erasure_requests"))) == 0


def test_an_erasure_that_completes_during_a_vectors_run_is_not_undone_by_it(
    landing, resources, instance, monkeypatch
):
    """The run read d1's profile before the erasure and writes its vector after it: it then
    records no run, so the next one computes every device and drops d1's vector (an incremental
    run would never look at d1 again)."""
    from persona_pipeline.feedback.assets import key_weights
    from persona_pipeline.ingest.assets import index_updates
    from persona_pipeline.personas import storage as persona_storage
    from persona_pipeline.personas.assets import device_profiles, persona_vectors
    from persona_pipeline_tests.conftest import update, write_jsonl

    devices = [f"d{i}" for i in range(1, 7)]
    for day, city in ((DAYS[0], "Berlin"), (DAYS[1], "Paris")):
        reporting = devices if day == DAYS[0] else devices[:2]
        write_jsonl(
            landing, day, [update(d, "device.location.city", city, f"{day}T10:00:00Z") for d in reporting]
        )
    ingest = [index_updates, device_profiles]
    assert dg.materialize(ingest, resources=resources, instance=instance, partition_key=DAYS[0]).success
    assert dg.materialize([key_weights, persona_vectors], resources=resources, instance=instance).success
    assert dg.materialize(ingest, resources=resources, instance=instance, partition_key=DAYS[1]).success

    real_write = persona_storage.write_vectors
    erased = []

    def write_after_an_erasure(store, rows, removed) -> None:
        if not erased:  # before the run's first write
            assert erase(resources, instance, devices=["d1"]).success
            erased.append("d1")
        real_write(store, rows, removed)

    monkeypatch.setattr(persona_storage, "write_vectors", write_after_an_erasure)
    assert dg.materialize([persona_vectors], resources=resources, instance=instance).success
    monkeypatch.undo()
    store = resources["persona_store"]
    assert "d1" in set(table(store, "persona_vectors")["device_id"])  # written back by the race
    assert table(store, "persona_vector_runs").empty

    after = dg.materialize([persona_vectors], resources=resources, instance=instance)
    metadata = after.asset_materializations_for_node("persona_vectors")[0].metadata
    assert metadata["computed"].value == "every device"
    assert set(table(store, "persona_vectors")["device_id"]) == set(devices) - {"d1"}


def _erasable_fleet(landing, resources, instance) -> None:
    """Six devices of two customers with a profile, a vector and a point in the index."""
    from persona_pipeline.feedback.assets import key_weights
    from persona_pipeline.ingest.assets import index_updates
    from persona_pipeline.personas.assets import device_profiles, persona_index, persona_vectors
    from persona_pipeline_tests.conftest import update, write_jsonl

    ingest = [index_updates, device_profiles]
    for day in DAYS:  # a history file per day
        rows = [
            update(f"d{i}", key, value, f"{day}T10:00:00Z", customer=f"c{i % 2}")
            for i in range(1, 7)
            for key, value in (("device.location.city", "Berlin"), ("device.usage.app_maps_duration", 60 * i))
        ]
        write_jsonl(landing, day, rows)
        assert dg.materialize(ingest, resources=resources, instance=instance, partition_key=day).success
    assert dg.materialize(
        [key_weights, persona_vectors, persona_index], resources=resources, instance=instance
    ).success


def _points(resources, devices: set[str]) -> int:
    with resources["vector_index"].open() as index:
        return sum(len(index.retrieve(c, [point_id(d) for d in devices])) for c in persona_collections(index))


def test_a_retried_erasure_counts_in_its_audit_what_every_attempt_deleted(
    landing, resources, instance, monkeypatch
):
    """The first attempt deletes the points and fails in the store; the retry finishes. The audit
    counts what both deleted, as one attempt that succeeded would have."""
    from persona_pipeline.erasure import jobs

    _erasable_fleet(landing, resources, instance)
    store = resources["persona_store"]
    erased = {"d1", "d3", "d5"}  # customer c1's
    points, rows = _points(resources, erased), stored_rows_of(resources, erased, set())
    assert points == 3 and rows["update_history"] == 12 and rows["device_profiles"] == 6
    real_delete = jobs.delete_device_rows
    attempts = []

    def fail_the_first_attempt(connection, devices):
        attempts.append(sorted(devices))
        if len(attempts) == 1:
            raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))
        return real_delete(connection, devices)

    monkeypatch.setattr(jobs, "delete_device_rows", fail_the_first_attempt)
    result = erase(resources, instance, customers=["c1"])

    assert result.success
    assert attempts == [sorted(erased), sorted(erased)]  # the retry found every device again
    assert set(stored_rows_of(resources, erased, set()).values()) == {0}
    assert _points(resources, erased) == 0
    audit = table(store, "erasure_requests").iloc[0]
    assert audit["points_deleted"] == points
    assert audit["rows_deleted"] == sum(rows.values())
    assert json.loads(audit["rows_by_table"])["update_history"] == rows["update_history"]
    assert audit["devices_erased"] == 3 and pd.notna(audit["completed_at"])


def test_an_erasure_whose_retries_run_out_keeps_what_it_deleted_and_no_completion(
    landing, resources, instance, monkeypatch
):
    from persona_pipeline.erasure import jobs

    _erasable_fleet(landing, resources, instance)

    def always_locked(connection, devices):
        raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

    monkeypatch.setattr(jobs, "delete_device_rows", always_locked)
    result = erase(resources, instance, devices=["d2"], raise_on_error=False)

    assert not result.success
    audit = table(resources["persona_store"], "erasure_requests")
    assert len(audit) == 1 and pd.isna(audit["completed_at"].iloc[0])  # not done: no completion
    assert audit["points_deleted"].iloc[0] == 1  # the point its first attempt deleted
    assert "d2" not in audit.astype(str).to_json()
    # Not a completed erasure: a vectors run that began before it may still record its run.
    assert count_erasures(resources["persona_store"]) == 0


def test_what_an_attempt_deletes_outside_the_store_is_counted_even_when_its_count_or_a_file_fails(
    landing, resources, instance, monkeypatch
):
    """The first attempt's count of the first collection's points fails (the store is locked)
    and a later attempt's second history file fails to be written: nothing is deleted uncounted,
    and the audit equals one clean erasure's."""
    from persona_pipeline.erasure import jobs
    from persona_pipeline.resources.update_history import UpdateHistory

    _erasable_fleet(landing, resources, instance)
    erased = {"d1", "d3", "d5"}
    points, rows = _points(resources, erased), stored_rows_of(resources, erased, set())
    real_record, real_write = jobs.record_erasure, UpdateHistory._write_file
    failures = {"record": 1, "write": 1}
    writes = []

    def record_unless_locked(connection, request, deleted, points, devices, completed_at):
        if failures["record"]:
            failures["record"] -= 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        return real_record(connection, request, deleted, points, devices, completed_at)

    def write_the_first_file_only(history, path, table, in_key_order=False):
        writes.append(path)
        if len(writes) == 2 and failures["write"]:
            failures["write"] -= 1
            raise OSError("disk full")
        return real_write(history, path, table, in_key_order)

    monkeypatch.setattr(jobs, "record_erasure", record_unless_locked)
    monkeypatch.setattr(UpdateHistory, "_write_file", write_the_first_file_only)
    result = erase(resources, instance, customers=["c1"])

    assert result.success and failures == {"record": 0, "write": 0}
    assert set(stored_rows_of(resources, erased, set()).values()) == {0}
    audit = table(resources["persona_store"], "erasure_requests").iloc[0]
    assert audit["points_deleted"] == points == 3
    assert json.loads(audit["rows_by_table"])["update_history"] == rows["update_history"] == 12
    assert audit["rows_deleted"] == sum(rows.values())


def test_a_store_error_does_not_show_the_ids_it_was_given(resources):
    """A failed statement's error reaches Dagster's run storage, which no erasure reaches: it
    names the statement, never its values."""
    store = resources["persona_store"]
    store.scalar(sa.select(sa.func.count()).select_from(tables.device_profiles))  # the schema exists

    def audit_row(requested_by: str) -> dict:
        return {
            "request_id": "r1",
            "requested_by": requested_by,
            "requested_at": pd.Timestamp("2026-03-01", tz="UTC"),
            "device_ids_requested": 1,
            "customer_ids_requested": 0,
            "devices_erased": 1,
            "rows_deleted": 0,
            "points_deleted": 0,
            "rows_by_table": "{}",
        }

    with store.begin() as connection:
        connection.execute(tables.erasure_requests.insert(), [audit_row("case-1")])
    with pytest.raises(sa.exc.IntegrityError) as raised, store.begin() as connection:
        connection.execute(tables.erasure_requests.insert(), [audit_row("device-4711-of-customer-0815")])
    assert "erasure_requests" in str(raised.value)
    assert "device-4711" not in str(raised.value)
