"""Device shards (PERSONA_DEVICE_SHARDS): every row and device in exactly one shard, a shard's run
touching only its own files and rejects, and N shards leaving the tables of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.demo.generator import generate_fleet, write_landing
from persona_pipeline.device_shards import DeviceShard, shard_of
from persona_pipeline.ingest.storage import rejects_replaced
from persona_pipeline.ingest.validation import rows_of_shard
from persona_pipeline.resources import PersonaStore
from persona_pipeline.resources.update_history import HistoryError, UpdateHistory
from persona_pipeline.store.tables import index_update_rejects
from persona_pipeline_tests import test_celery as celery_tests
from persona_pipeline_tests.conftest import store_url, update, write_file, write_jsonl

BIN = Path(sys.executable).parent
START, DAYS = "2026-03-01", 3
END = "2026-03-03"


def test_every_row_is_in_exactly_one_shard_by_its_id_as_validation_accepts_it():
    composed = "café-7"
    raw = pd.DataFrame(
        {
            "device_id": [
                "dev-1",
                "  dev-1 ",
                unicodedata.normalize("NFD", composed),
                composed,
                None,
                "",
                *[f"d{i}" for i in range(200)],
            ]
        }
    )
    shards = [DeviceShard(index, 4) for index in range(4)]
    parts = [rows_of_shard(raw, shard) for shard in shards]
    assert sorted(index for part in parts for index in part.index) == list(raw.index)
    home = {label: next(i for i, part in enumerate(parts) if label in part.index) for label in raw.index}
    # A padded id and a decomposed one are the ids validation accepts, so they share those shards.
    assert home[0] == home[1] and home[2] == home[3]
    assert home[4] == home[5] == int(shard_of(pd.Series([""]), 4)[0])
    assert len({home[label] for label in range(6, len(raw))}) == 4  # 200 ids spread over all four


def test_a_shard_is_one_of_its_count():
    with pytest.raises(ValueError, match=r"^device shard 4 is not one of 0\.\.3$"):
        DeviceShard(4, 4)


def history_rows(day: str, devices: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "partition_date": day,
            "device_id": devices,
            "customer_id": None,
            "key": "device.location.city",
            "value": "Berlin",
            "value_number": None,
            "observed_at": pd.Timestamp(f"{day}T10:00:00Z"),
            "source_file": "f.jsonl",
            "source_row": range(len(devices)),
        }
    )


def test_a_shard_writes_its_own_file_and_refuses_another_shards_rows(tmp_path):
    devices = pd.Series([f"d{i}" for i in range(60)])
    numbers = shard_of(devices, 3)
    history = UpdateHistory(tmp_path, shards=3)
    for index in range(3):
        history.write_shard(
            [START], DeviceShard(index, 3), history_rows(START, devices[numbers == index].tolist())
        )
    assert sorted(history.read([START])["device_id"]) == sorted(devices)
    before = {path: Path(path).stat().st_mtime_ns for path in history.files([START])}

    # Shard 1 again, with fewer rows: only its file changes.
    history.write_shard([START], DeviceShard(1, 3), history_rows(START, devices[numbers == 1].tolist()[:2]))
    changed = [Path(path) for path in history.files([START]) if Path(path).stat().st_mtime_ns != before[path]]
    assert [path.parent.name for path in changed] == ["shard=1"]
    assert len(history.read([START], shard=1)) == 2
    assert len(history.read([START], shard=0)) == (numbers == 0).sum()

    with pytest.raises(HistoryError, match="rows given for shard 0 are another shard's"):
        history.write_shard([START], DeviceShard(0, 3), history_rows(START, devices[numbers == 2].tolist()))
    with pytest.raises(HistoryError, match="keeps 3 shards per day"):
        history.write_shard([START], DeviceShard(0, 2), history_rows(START, []))
    later = history_rows("2026-03-05", devices[numbers == 0].tolist())
    with pytest.raises(HistoryError, match=r"rows given for 2026-03-01 are of another day"):
        history.write_shard([START], DeviceShard(0, 3), later)
    assert len(history.read([START], shard=0)) == (numbers == 0).sum()  # nothing written


def test_a_shard_run_replaces_its_own_rejects_and_those_of_another_shard_count(persona_home):
    store = PersonaStore(url=store_url(persona_home))
    rows = pd.DataFrame(
        {
            "partition_date": START,
            "source_file": "f.jsonl",
            "source_row": range(5),
            "raw": "{}",
            "reason": "bad",
            "reason_code": "bad",
            "rejected_at": pd.Timestamp("2026-03-02T00:00:00Z"),
            "device_id": None,
            "device_shard": [0, 1, 1, None, 0],
            "device_shards": [2, 2, 2, None, 3],
        }
    )
    with store.begin() as connection:
        store.insert_frame(connection, index_update_rejects, rows)
    store.replace_rows(index_update_rejects, rejects_replaced([START], DeviceShard(1, 2)), rows.iloc[0:0])
    kept = store.read_frame(sa.select(index_update_rejects.c.source_row))["source_row"].tolist()
    assert kept == [0]  # shard 0 of 2 stays; its own, the unrecorded and the 3-shard rows go
    store.replace_rows(index_update_rejects, rejects_replaced([START], None), rows.iloc[0:0])
    assert store.read_frame(sa.select(index_update_rejects.c.source_row)).empty


COMPARED = {
    "device_profiles": ["device_id", "key"],
    "index_update_rejects": ["partition_date", "source_file", "source_row"],
    "persona_vectors": ["device_id"],
    "device_clusters": ["device_id"],
    "anomaly_scores": ["device_id"],
    "service_recommendations": ["offer_id"],
    "support_tickets": ["ticket_id"],
}
# Wall-clock columns, and the shard a reject was written by: the rest must match.
UNCOMPARED = {
    "computed_at",
    "clustered_at",
    "fitted_at",
    "scored_at",
    "created_at",
    "updated_at",
    "first_seen_at",
    "last_seen_at",
    "rejected_at",
    "device_shard",
    "device_shards",
}


def landed_fleet(landing: Path) -> None:
    """A demo fleet, plus rows that test the shard of an id: padded, decomposed, missing, unparsed."""
    write_landing(generate_fleet(240, DAYS, seed=11, start=START), landing)
    day = START
    write_jsonl(
        landing,
        day,
        [
            update("  pad-1 ", "device.location.city", "Köln", f"{day}T09:00:00Z"),
            update(
                unicodedata.normalize("NFD", "café-2"), "device.location.city", "Lyon", f"{day}T09:00:00Z"
            ),
            update("café-2", "device.connection.signal_strength", -70, f"{day}T09:05:00Z"),
            {"key": "device.location.city", "value": "Rome", "observed_at": f"{day}T09:00:00Z"},
        ],
        name="planted.jsonl",
    )
    write_file(
        landing,
        day,
        "broken.jsonl",
        '{"device_id": "x", "key": \n' + json.dumps(update("pad-1", "k", 1, f"{day}T10:00:00Z")) + "\n",
    )


def run_chain(home: Path, shards: int, start: str = START, end: str = END) -> str:
    env = celery_tests.clean_env(
        home,
        PERSONA_DB_URL=store_url(home),  # the backend --store names: concurrent writers on PostgreSQL
        PERSONA_DEVICE_SHARDS=str(shards),
        PERSONA_NORMS_KEY="k" * 40,
    )
    done = subprocess.run(
        [str(BIN / "persona-pipeline"), "run", "--start", start, "--end", end],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def last_vector_computations(home: Path) -> dict[str, tuple[str, int]]:
    """Per shard, how the newest persona_vectors run chose its devices and how many it computed."""
    found: dict[str, tuple[str, int]] = {}
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("persona_vectors"), limit=100).records
        for record in records:  # newest first
            materialization = record.asset_materialization
            metadata = materialization.metadata
            found.setdefault(
                materialization.partition,
                (metadata["computed"].value, metadata["devices_computed"].value),
            )
    return found


def vector_runs(home: Path) -> pd.DataFrame:
    engine = sa.create_engine(store_url(home))
    try:
        with engine.connect() as connection:
            return pd.read_sql(sa.text("select * from persona_vector_runs"), connection)
    finally:
        engine.dispose()


def tables(home: Path) -> dict[str, pd.DataFrame]:
    return celery_tests.tables(home, COMPARED, UNCOMPARED, url=store_url(home))


def test_three_shards_leave_the_tables_of_one_and_a_rerun_changes_nothing(tmp_path):
    homes = {shards: tmp_path / f"shards-{shards}" for shards in (1, 3)}
    for home in homes.values():
        home.mkdir()
        landed_fleet(home / "landing")
        run_chain(home, 1 if home == homes[1] else 3)

    one, three = tables(homes[1]), tables(homes[3])
    for name, frame in one.items():
        pd.testing.assert_frame_equal(three[name], frame, obj=name)
    assert one["device_profiles"]["device_id"].nunique() == 242  # the fleet, pad-1 and café-2
    assert {"pad-1", "café-2"} <= set(one["device_profiles"]["device_id"])
    assert {"missing_device_id", "unreadable"} <= set(one["index_update_rejects"]["reason_code"])

    history = UpdateHistory(homes[3] / "history", shards=3)
    files = [Path(path) for path in history.files([START])]
    assert [path.parent.name for path in files] == ["shard=0", "shard=1", "shard=2"]
    for index in range(3):
        devices = history.read([START], ["device_id"], shard=index)["device_id"]
        assert (shard_of(devices, 3) == index).all()

    # The shards' runs again over the same days: the same tables (each shard replaced only its own).
    run_chain(homes[3], 3)
    again = tables(homes[3])
    for name in ("device_profiles", "index_update_rejects", "persona_vectors"):
        pd.testing.assert_frame_equal(again[name], one[name], obj=name)
    run_chain(homes[1], 1)  # both stores have run the days twice (the offers' contact policy counts)

    # A day on which a few devices report (three move city): each shard's vectors follow the
    # change, computing only its changed devices, and still leave the tables of one shard.
    movers = sorted(one["persona_vectors"]["device_id"])[:8]
    later = "2026-03-04"
    rows = [update(device, "device.location.city", "Oslo", f"{later}T08:00:00Z") for device in movers[:3]]
    rows += [update(device, "device.battery.level", 12, f"{later}T09:00:00Z") for device in movers[3:]]
    for home in homes.values():
        write_jsonl(home / "landing", later, rows)
        run_chain(home, 1 if home == homes[1] else 3, later, later)
    one, three = tables(homes[1]), tables(homes[3])
    for name, frame in one.items():
        pd.testing.assert_frame_equal(three[name], frame, obj=name)
    computed = last_vector_computations(homes[3])
    assert sorted(computed) == ["0", "1", "2"]
    assert {how for how, _ in computed.values()} == {"the devices whose vector may have changed"}
    [(how, unsharded)] = last_vector_computations(homes[1]).values()
    assert how == "the devices whose vector may have changed"
    # The reporters and those whose moved-recently flag the passing day may turn, of the 242.
    assert len(movers) <= unsharded < 50
    assert sum(devices for _, devices in computed.values()) == unsharded
    runs = vector_runs(homes[3])
    assert sorted(runs["device_shard"]) == [0, 1, 2] and set(runs["device_shards"]) == {3}
    assert runs["devices"].sum() == len(one["persona_vectors"])


def test_the_history_shard_count_follows_the_device_shards(monkeypatch):
    from persona_pipeline import settings

    monkeypatch.setenv("PERSONA_DEVICE_SHARDS", "4")
    monkeypatch.delenv("PERSONA_HISTORY_SHARDS", raising=False)
    assert (settings.device_shards(), settings.history_shards()) == (4, 4)
    monkeypatch.setenv("PERSONA_HISTORY_SHARDS", "8")
    with pytest.raises(ValueError, match=r"^PERSONA_HISTORY_SHARDS=8 differs from PERSONA_DEVICE_SHARDS=4"):
        settings.history_shards()
    store = PersonaStore(url="sqlite://", history_dir="/nonexistent", history_shards=8)
    monkeypatch.delenv("PERSONA_HISTORY_SHARDS")
    with pytest.raises(
        ValueError, match=r"^PersonaStore.history_shards=8 differs from PERSONA_DEVICE_SHARDS=4"
    ):
        store.history  # noqa: B018
    monkeypatch.setenv("PERSONA_DEVICE_SHARDS", "many")
    with pytest.raises(
        ValueError, match=r"^PERSONA_DEVICE_SHARDS='many': expected a whole number from 1 to 1024$"
    ):
        settings.device_shards()


# Run in a process of its own: the partitions come from PERSONA_DEVICE_SHARDS when the code loads.
AUTOMATION_SCRIPT = """
import json, os, time
from datetime import UTC, datetime
import dagster as dg
from persona_pipeline.definitions import defs
from persona_pipeline.ingest.jobs import ingest_schedule
from persona_pipeline.ingest.sensors import index_updates_sensor
from persona_pipeline.resources import LandingZone

landing = LandingZone(path=os.environ["PERSONA_LANDING_DIR"])
found = {}
context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 3, 3, 0, 30, tzinfo=UTC))
found["schedule"] = [request.partition_key for request in ingest_schedule(context)]
with dg.instance_for_test() as instance:
    def tick():
        context = dg.build_sensor_context(instance=instance, resources={"landing_zone": landing})
        return [request.partition_key for request in index_updates_sensor(context).run_requests]
    found["sensor"] = tick()
    ingest = defs.resolve_job_def("ingest_job")
    run = ingest.execute_in_process(instance=instance, partition_key="2026-03-02|1")
    found["one_shard_run"] = run.success
    found["sensor_after"] = tick()
print(json.dumps(found))
"""


@pytest.mark.store_agnostic
def test_the_schedule_and_the_landing_sensor_ask_for_every_shard_not_read(tmp_path):
    home = tmp_path / "home"
    landing = home / "landing"
    path = write_jsonl(
        landing, "2026-03-02", [update("d1", "device.model", "X", "2026-03-02T08:00:00+00:00")]
    )
    past = path.stat().st_mtime - 3600
    os.utime(path, (past, past))
    os.utime(path.parent, (past, past))
    env = celery_tests.clean_env(
        home,
        PERSONA_LANDING_DIR=str(landing),
        PERSONA_DEVICE_SHARDS="2",
        PERSONA_PARTITION_START="2026-03-01",
    )
    done = subprocess.run(
        [sys.executable, "-c", AUTOMATION_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["schedule"] == ["2026-03-02|0", "2026-03-02|1"]
    assert found["sensor"] == ["2026-03-02|0", "2026-03-02|1"]
    assert found["one_shard_run"]
    assert found["sensor_after"] == ["2026-03-02|0"]  # shard 1 was read after the file last changed


# Run in a process of its own (PERSONA_DEVICE_SHARDS is read when the code loads): ingest every
# partition of the day given, in order, and print each run's reject-share check.
REJECT_CHECK_SCRIPT = """
import json, sys
from persona_pipeline.definitions import defs
from persona_pipeline.partitions import device_day_keys

ingest = defs.resolve_job_def("ingest_job")
checks = []
for key in device_day_keys(sys.argv[1]):
    result = ingest.execute_in_process(partition_key=key, raise_on_error=False)
    evaluations = result.get_asset_check_evaluations()
    [check] = [c for c in evaluations if c.check_name == "reject_share_within_threshold"]
    checks.append({"passed": check.passed, "share": check.metadata["reject_share"].value})
print(json.dumps(checks))
"""


def reject_checks(home: Path, shards: int, day: str) -> list[dict]:
    env = celery_tests.clean_env(
        home,
        PERSONA_DB_URL=store_url(home),
        PERSONA_DEVICE_SHARDS=str(shards),
        PERSONA_PARTITION_START="2026-03-01",
    )
    done = subprocess.run(
        [sys.executable, "-c", REJECT_CHECK_SCRIPT, day], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_shards_reject_check_judges_the_days_rows_not_its_own(tmp_path):
    """One device's 300 bad rows (2.9 % of the day) all fall in one shard: that shard alone would
    reject 11 % of its rows and fail; it judges the day's rows instead. A day over the threshold
    fails on the shard that completes it, with the unsharded share."""
    clustered, spread = "2026-03-02", "2026-03-03"
    good = [
        update(f"d{i % 2000}", "device.location.city", "Berlin", f"{clustered}T10:00:00Z")
        for i in range(10_000)
    ]
    bad_device = [update("noisy", "device.location.city", "Rome", "not a time") for _ in range(300)]
    spread_rows = [
        update(
            f"d{i}", "device.location.city", "Berlin", "not a time" if i % 10 == 0 else f"{spread}T10:00:00Z"
        )
        for i in range(2_000)
    ]
    homes = {shards: tmp_path / f"shards-{shards}" for shards in (1, 4)}
    for home in homes.values():
        write_jsonl(home / "landing", clustered, good + bad_device)
        write_jsonl(home / "landing", spread, spread_rows)

    [whole] = reject_checks(homes[1], 1, clustered)
    assert whole == {"passed": True, "share": pytest.approx(300 / 10_300, abs=1e-5)}
    by_shard = reject_checks(homes[4], 4, clustered)
    assert all(check["passed"] for check in by_shard)
    assert by_shard[-1]["share"] == pytest.approx(whole["share"], abs=1e-5)

    [whole] = reject_checks(homes[1], 1, spread)
    assert whole == {"passed": False, "share": pytest.approx(0.1, abs=1e-5)}
    by_shard = reject_checks(homes[4], 4, spread)
    assert [check["share"] for check in by_shard] == sorted(check["share"] for check in by_shard)
    assert by_shard[-1] == whole


# Run in a process of its own: the partitions come from PERSONA_DEVICE_SHARDS when the code loads.
VECTOR_SHARDS_SCRIPT = """
import json
import tempfile
import dagster as dg
from persona_pipeline.definitions import defs
from persona_pipeline.feedback.sensors import key_weights_sensor
from persona_pipeline.resources import PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.segments.assets import device_clusters

found = {}
graph = defs.resolve_asset_graph()
found["vector_partitions"] = graph.get(dg.AssetKey("persona_vectors")).partitions_def.get_partition_keys()
with dg.instance_for_test() as instance:
    def materialized(key, partition=None, **metadata):
        event = dg.AssetMaterialization(key, partition=partition, metadata=metadata)
        instance.report_runless_asset_event(event)

    def wanted(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        keys = sorted(
            (key.to_user_string(), sorted(result.get_requested_partitions(key)))
            for key in graph.get_all_asset_keys()
            if result.get_num_requested(key)
        )
        return result.cursor, keys

    cursor, _ = wanted(None)
    materialized("key_weights", live_version_changed=True)
    materialized("index_updates", "2026-03-02|1")
    materialized("device_profiles", "2026-03-02|1")
    cursor, found["after_shard_1"] = wanted(cursor)
    materialized("persona_vectors", "1")
    materialized("device_clusters", "1")
    cursor, found["after_vectors_1"] = wanted(cursor)
    materialized("persona_index")
    materialized("segments")
    cursor, found["after_fit"] = wanted(cursor)
    materialized("device_clusters", "0")
    blocker = tempfile.NamedTemporaryFile()  # a file where the store's folder would be
    unreachable = {
        "persona_store": PersonaStore(url=f"sqlite:///{blocker.name}/persona.db"),
        "vector_index": VectorIndex(path="/nonexistent/qdrant"),
        "persona_config": PersonaConfig(),
    }
    failed = dg.materialize(
        [device_clusters], resources=unreachable, instance=instance, partition_key="1", raise_on_error=False
    )
    assert not failed.success
    cursor, found["after_shard_1_failed"] = wanted(cursor)
    materialized("device_clusters", "1")
    cursor, found["after_every_shard_assigned"] = wanted(cursor)
    found["weights_requests"] = [
        request.partition_key
        for request in key_weights_sensor(dg.build_sensor_context(instance=instance)).run_requests
    ]
print(json.dumps(found))
"""


@pytest.mark.store_agnostic
def test_vectors_are_partitioned_by_shard_and_follow_their_shards_profiles(tmp_path):
    """With shards, persona_vectors has a partition per shard: one shard's new profiles ask for
    that shard's vectors, whose materialization asks for the fleet-wide steps; new weights ask
    for the vectors of every shard not rebuilt since."""
    home = tmp_path / "home"
    env = celery_tests.clean_env(
        home, PERSONA_DEVICE_SHARDS="2", PERSONA_PARTITION_START="2026-03-01", PERSONA_NORMS_KEY="k" * 40
    )
    done = subprocess.run(
        [sys.executable, "-c", VECTOR_SHARDS_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["vector_partitions"] == ["0", "1"]
    # A shard's vectors, and its devices' segments of the last fit in the same run.
    assert found["after_shard_1"] == [["device_clusters", ["1"]], ["persona_vectors", ["1"]]]
    # Then the fleet-wide index and fit; the scores and offers wait for the fit to be applied.
    assert found["after_vectors_1"] == [["persona_index", [None]], ["segments", [None]]]
    assert found["after_fit"] == [["device_clusters", ["0", "1"]]]
    assert found["after_shard_1_failed"] == []  # no scores or offers over a shard left on the old fit
    assert found["after_every_shard_assigned"] == [
        ["anomaly_scores", [None]],
        ["service_recommendations", [None]],
    ]
    assert found["weights_requests"] == ["0"]  # shard 1's vectors came after the new weights


def test_a_vector_run_of_another_shard_count_is_forgotten_so_a_count_used_again_starts_afresh(persona_home):
    from persona_pipeline.personas import storage as persona_storage

    store = PersonaStore(url=store_url(persona_home))
    run = persona_storage.VectorRun("s-w1", pd.Timestamp("2026-03-01T10:00:00Z"), 100)
    assert persona_storage.record_vector_run(store, run, None, erasures_at_start=0)
    assert persona_storage.read_last_vector_run(store) == run
    for index in range(3):
        later = persona_storage.VectorRun("s-w1", pd.Timestamp("2026-03-20T10:00:00Z"), 30)
        assert persona_storage.record_vector_run(store, later, DeviceShard(index, 3), erasures_at_start=0)
    # Back to one shard: the run of before would set the moved-recently flags at its old time.
    assert persona_storage.read_last_vector_run(store) is None
    assert persona_storage.read_last_vector_run(store, DeviceShard(2, 3)) == later
    # A run that saw an erasure begin and end records nothing.
    assert not persona_storage.record_vector_run(store, run, None, erasures_at_start=-1)
    assert persona_storage.read_last_vector_run(store) is None


# Run in a process of its own (PERSONA_DEVICE_SHARDS is read when the code loads): the demo's
# weights comparison re-makes a day's offers in its stores, the vectors a run per shard.
OFFERS_AGAIN_SCRIPT = """
import json, sys
from persona_pipeline.app.demo_loop import forget_day, offers_again
from persona_pipeline.definitions import build_resources

r = build_resources(resolved=True)
forget_day(r["persona_store"], sys.argv[1])
stores = r["persona_store"], r["vector_index"], r["persona_config"], r["landing_zone"]
offers = offers_again(*stores, sys.argv[1], None)
print(json.dumps(len(offers)))
"""


@pytest.mark.store_agnostic
def test_the_weights_comparison_remakes_a_days_offers_over_shards(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    write_landing(generate_fleet(120, 2, seed=5, start=START), home / "landing")
    env = celery_tests.clean_env(home, PERSONA_DEVICE_SHARDS="2", PERSONA_NORMS_KEY="k" * 40)
    run = [str(BIN / "persona-pipeline"), "run", "--start", START, "--end", "2026-03-02"]
    done = subprocess.run(run, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    made = pd.read_sql_table("service_recommendations", f"sqlite:///{home / 'persona.db'}")
    day = made["offer_day"].max()
    again = subprocess.run(
        [sys.executable, "-c", OFFERS_AGAIN_SCRIPT, day], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == int((made["offer_day"] == day).sum())


def test_the_fleet_wide_steps_refuse_vectors_in_two_feature_spaces_and_name_the_shards(
    landing, resources, instance
):
    """Some shards rebuilt with new weights, some not yet (or failed): the index, the segments
    and the scores each fail at once saying so, without retries, rather than mixing the spaces."""
    from persona_pipeline.anomalies.assets import anomaly_scores
    from persona_pipeline.feedback.assets import key_weights
    from persona_pipeline.ingest.assets import index_updates
    from persona_pipeline.personas.assets import device_profiles, persona_index, persona_vectors
    from persona_pipeline.segments.assets import device_clusters

    rows = [update(f"d{i}", "device.location.city", "Berlin", f"{START}T10:00:00Z") for i in range(30)]
    write_jsonl(landing, START, rows)
    ingest = [index_updates, device_profiles]
    assert dg.materialize(ingest, resources=resources, instance=instance, partition_key=START).success
    assert dg.materialize([key_weights, persona_vectors], resources=resources, instance=instance).success
    with resources["persona_store"].begin() as connection:
        connection.execute(sa.text("update persona_vectors set space = 'newer-w9' where device_id = 'd7'"))
    for asset in (persona_index, device_clusters, anomaly_scores):
        result = dg.materialize([asset], resources=resources, instance=instance, raise_on_error=False)
        [failure] = [event for event in result.all_events if event.is_step_failure]
        message = failure.step_failure_data.error.message
        assert "persona_vectors holds several feature spaces" in message, asset.key
        assert "the shards not rebuilt since the newest key weights" in message
        retries = [event for event in result.all_events if event.event_type_value == "STEP_UP_FOR_RETRY"]
        assert not retries
