"""The landing zone and the update history on an object store: an S3-compatible server started on
loopback, read and written through `s3://` URLs, give what the same files give in local folders."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from persona_pipeline import settings
from persona_pipeline.device_shards import DeviceShard, shard_of
from persona_pipeline.file_store import StorageLocationError
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.personas.assets import device_profiles
from persona_pipeline.resources import LandingZone, PersonaStore
from persona_pipeline.resources.persona_store import HISTORY_LOCK_KEY, history_beside, history_lock
from persona_pipeline.resources.update_history import HistoryError, UpdateHistory
from persona_pipeline_tests.conftest import resources_for, store_url, table, update, write_file, write_jsonl

DAYS = ["2026-03-01", "2026-03-02"]
CITY = "device.location.city"
APP = "device.usage.app_maps_duration"


def landing_with_every_kind_of_entry(landing: Path) -> None:
    """Good files in three formats, and each kind of entry the landing zone refuses or skips."""
    write_jsonl(
        landing,
        DAYS[0],
        [update(f"d{n}", CITY, "Berlin", f"{DAYS[0]}T10:00:0{n}Z", customer=f"c{n}") for n in range(5)]
        + [{"device_id": "d9", "key": CITY}],  # no value, no time: a row reject
    )
    csv = (
        "device_id,key,value,observed_at\n"
        f"d1,{APP},5400,{DAYS[0]}T11:00:00Z\nd2,{APP},oops,{DAYS[0]}T11:00:00Z\n"
    )
    write_file(landing, DAYS[0], "part-1.csv.gz", gzip.compress(csv.encode()))
    write_file(landing, DAYS[0], "notes.txt", "not an update file")
    write_file(landing, DAYS[0], "_SUCCESS", "")
    write_file(landing, DAYS[0], ".partial.jsonl", "half a file")
    write_jsonl(
        landing, f"{DAYS[0]}/late", [update("d3", CITY, "Paris", f"{DAYS[0]}T12:00:00Z")], "inner.jsonl"
    )
    parquet = pa.table(
        {
            "device_id": ["d1", "d4"],
            "key": [CITY, CITY],
            "value": ["Rome", "Oslo"],
            "observed_at": [f"{DAYS[1]}T09:00:00Z"] * 2,
        }
    )
    folder = landing / "index_updates" / f"date={DAYS[1]}"
    folder.mkdir(parents=True)
    pq.write_table(parquet, folder / "part-0.parquet")
    write_jsonl(landing, "2026-3-3", [update("d1", CITY, "Nice", "2026-03-03T09:00:00Z")])
    (landing / "index_updates" / "stray.jsonl").write_text("{}\n")
    feedback = landing / "offer_feedback"
    for batch, complete in (("b1", True), ("b2", False), ("bad..id", True)):
        (feedback / f"batch={batch}").mkdir(parents=True)
        (feedback / f"batch={batch}" / "part.csv").write_text(
            f"offer_id,response,responded_at\no-{batch},accepted,{DAYS[1]}T10:00:00Z\n"
        )
        if complete:
            (feedback / f"batch={batch}" / "_SUCCESS").write_text("")
    (feedback / "other").mkdir()
    (feedback / "other" / "x.csv").write_text("offer_id\n")


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["source_file", "source_row", "reason"][: len(frame.columns)]).reset_index(
        drop=True
    )


def test_a_landing_zone_on_an_object_store_reads_what_the_local_folder_reads(tmp_path, object_store):
    local = tmp_path / "landing"
    landing_with_every_kind_of_entry(local)
    object_store.upload(local, "landing")
    here, there = LandingZone(path=str(local)), LandingZone(path=object_store.url("landing"))

    assert there.landed_days() == here.landed_days() == DAYS
    assert there.misnamed_folders() == here.misnamed_folders() == ["date=2026-3-3"]
    assert there.updates_folder_problems() == here.updates_folder_problems()
    assert len(there.updates_folder_problems()) == 2
    assert there.complete_feedback_batches() == here.complete_feedback_batches() == ["b1"]
    assert sorted(there.feedback_folder_problems()) == sorted(here.feedback_folder_problems())
    assert len(there.feedback_folder_problems()) == 2

    for day in DAYS:
        near, far = here.read_day(day), there.read_day(day)
        assert len(near.rows) > 0 and sorted(far.problems) == sorted(near.problems)
        columns = ["source_file", "source_row"]
        pd.testing.assert_frame_equal(
            far.rows.sort_values(columns).reset_index(drop=True),
            near.rows.sort_values(columns).reset_index(drop=True),
        )
        pd.testing.assert_frame_equal(
            far.rejects.sort_values(columns).reset_index(drop=True),
            near.rejects.sort_values(columns).reset_index(drop=True),
        )
    rejected = set(there.read_day(DAYS[0]).rejects["source_file"])
    assert {
        f"index_updates/date={DAYS[0]}/notes.txt",
        f"index_updates/date={DAYS[0]}/late/inner.jsonl",
    } <= rejected

    near, far = here.read_feedback_batch("b1"), there.read_feedback_batch("b1")
    pd.testing.assert_frame_equal(far.rows, near.rows)
    assert far.rows["offer_id"].tolist() == ["o-b1"]
    with pytest.raises(FileNotFoundError, match="feedback batch b2 is not complete"):
        there.read_feedback_batch("b2")


def test_a_day_on_an_object_store_settles_and_a_new_file_changes_its_fingerprint(tmp_path, object_store):
    local = tmp_path / "landing"
    write_jsonl(local, DAYS[0], [update("d1", CITY, "Berlin", f"{DAYS[0]}T10:00:00Z")])
    object_store.upload(local, "landing")
    there = LandingZone(path=object_store.url("landing"))
    assert there.settled_day_fingerprints(settle_seconds=3600) == {}  # just written: may still grow
    first = there.settled_day_fingerprints(settle_seconds=0)
    assert list(first) == [DAYS[0]]

    write_jsonl(local, DAYS[0], [update("d2", CITY, "Rome", f"{DAYS[0]}T10:00:00Z")], "part-1.jsonl")
    object_store.upload(local, "landing")
    second = there.settled_day_fingerprints(settle_seconds=0)
    assert list(second) == [DAYS[0]] and second != first


def history_frame(day: str, devices: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "partition_date": day,
            "device_id": devices,
            "customer_id": [f"customer-of-{d}" for d in devices],
            "key": CITY,
            "value": "Berlin",
            "value_number": None,
            "observed_at": pd.Timestamp(f"{day}T10:00:00Z"),
            "source_file": "f.jsonl",
            "source_row": range(len(devices)),
        }
    )


def test_the_update_history_on_an_object_store_keeps_what_a_local_one_keeps(tmp_path, object_store):
    url = f"sqlite:///{tmp_path / 'persona.db'}"
    assert PersonaStore(url=url).engine.dialect.name == "sqlite"  # the lock file goes beside it
    far = history_beside(url, object_store.url("history"), shards=3)
    near = UpdateHistory(tmp_path / "history", shards=3)
    devices = [f"device-{n}" for n in range(40)]
    both = pd.concat([history_frame(DAYS[0], devices), history_frame(DAYS[1], devices[:10])])
    first_five = pd.Series(devices[:5])
    of_shard_one = first_five[shard_of(first_five, 3) == 1].tolist()
    for history in (near, far):
        history.write_days(DAYS, both)
        history.write_shard([DAYS[1]], DeviceShard(1, 3), history_frame(DAYS[1], of_shard_one))
        assert history.remove_devices(["device-2"]) >= 1
    assert far.days() == near.days() == DAYS
    assert far.count_by_day(DAYS).tolist() == near.count_by_day(DAYS).tolist()
    order = ["partition_date", "device_id"]
    pd.testing.assert_frame_equal(
        far.read().sort_values(order).reset_index(drop=True),
        near.read().sort_values(order).reset_index(drop=True),
    )
    assert far.devices_of_customers(["customer-of-device-7"]) == {"device-7"}
    assert len(far.read([DAYS[0]], shard=0)) == len(near.read([DAYS[0]], shard=0)) > 0
    # Only the day files are there: no temporary object is left behind.
    assert all(name.endswith("/part-0.parquet") for name in object_store.names("history"))
    assert len(object_store.names("history")) == len(near.files())


def test_a_foreign_object_in_the_history_is_one_line_naming_it(tmp_path, object_store):
    far = history_beside(f"sqlite:///{tmp_path / 'persona.db'}", object_store.url("history"), shards=1)
    far.write_days([DAYS[0]], history_frame(DAYS[0], ["a", "b"]))
    with object_store.filesystem.open_output_stream(
        f"{object_store.bucket}/history/index_updates/date={DAYS[0]}/shard=1/part-0.parquet"
    ) as stream:
        stream.write(b"not parquet at all")
    with pytest.raises(HistoryError) as raised:
        far.read([DAYS[0]])
    message = str(raised.value)
    assert message.startswith(
        f"{object_store.url('history')}/index_updates/date={DAYS[0]}/shard=1/part-0.parquet: "
    )
    assert "not a readable Parquet file" in message and "\n" not in message


def test_an_object_store_history_without_a_shared_lock_refuses_to_write(object_store):
    history = UpdateHistory(object_store.url("history"))
    with pytest.raises(HistoryError, match="open it through the persona store"):
        history.write_days([DAYS[0]], history_frame(DAYS[0], ["a"]))
    assert object_store.names("history") == []


def test_the_history_lock_on_postgresql_is_held_for_every_connection(postgres_database):
    url = postgres_database()
    other = sa.create_engine(url)
    try:

        def try_lock() -> bool:
            with other.connect() as connection:
                taken = connection.execute(
                    sa.text("select pg_try_advisory_lock(:key)"), {"key": HISTORY_LOCK_KEY}
                ).scalar()
                if taken:
                    connection.execute(sa.text("select pg_advisory_unlock(:key)"), {"key": HISTORY_LOCK_KEY})
                return bool(taken)

        with history_lock(url):
            assert not try_lock()
            # Another process waits for it (a thread on its own connection stands in for one).
            done = threading.Event()

            def wait_for_lock() -> None:
                with history_lock(url):
                    done.set()

            waiter = threading.Thread(target=wait_for_lock)
            waiter.start()
            assert not done.wait(timeout=1.0)
        assert done.wait(timeout=30)
        waiter.join()
        assert try_lock()
    finally:
        other.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:hunter2-secret@bucket/landing",
        "s3://bucket/landing?access_key=AKIAEXAMPLE&secret_key=hunter2-secret",
    ],
)
def test_credentials_in_a_storage_url_are_refused_without_showing_them(url, persona_home, monkeypatch):
    with pytest.raises(StorageLocationError) as raised:
        LandingZone(path=url).landed_days()
    message = str(raised.value)
    assert message.startswith("PERSONA_LANDING_DIR=s3://") and "credentials do not go in the URL" in message
    assert "hunter2" not in message and "\n" not in message

    monkeypatch.setenv("PERSONA_HISTORY_DIR", url.replace("landing", "history"))
    with pytest.raises(StorageLocationError) as raised:
        _ = PersonaStore(url=store_url(persona_home)).history
    assert str(raised.value).startswith("PERSONA_HISTORY_DIR=s3://") and "hunter2" not in str(raised.value)


def test_settings_keep_a_storage_url_as_given_and_a_local_folder_absolute(persona_home, monkeypatch):
    monkeypatch.setenv("PERSONA_LANDING_DIR", "s3://bucket/landing")
    monkeypatch.setenv("PERSONA_HISTORY_DIR", "relative/history")
    assert settings.landing_location() == "s3://bucket/landing"
    assert settings.history_location() == str(Path("relative/history").resolve())
    with pytest.raises(ValueError, match="PERSONA_LANDING_DIR is an object-store URL"):
        settings.landing_dir()


def test_ingest_and_profiles_read_and_write_an_object_store(persona_home, tmp_path, object_store, instance):
    local = tmp_path / "landing"
    landing_with_every_kind_of_entry(local)
    object_store.upload(local, "landing")
    results = {}
    for name, landing_path, history_dir in (
        ("local", str(local), str(tmp_path / "history")),
        ("object store", object_store.url("landing"), object_store.url("history")),
    ):
        home = tmp_path / name
        resources = {
            **resources_for(home),
            "persona_store": PersonaStore(url=store_url(home), history_dir=history_dir),
            "landing_zone": LandingZone(path=landing_path),
        }
        for day in DAYS:
            result = dg.materialize(
                [index_updates, device_profiles], resources=resources, instance=instance, partition_key=day
            )
            assert result.success
        store = resources["persona_store"]
        results[name] = (
            table(store, "device_profiles", ["device_id", "key"]),
            table(store, "index_update_rejects", ["source_file", "source_row"]).drop(columns=["rejected_at"]),
            store.history.read()
            .sort_values(["partition_date", "source_file", "source_row"])
            .reset_index(drop=True),
        )
    for near, far in zip(results["local"], results["object store"], strict=True):
        pd.testing.assert_frame_equal(far, near)
    assert len(results["object store"][0]) > 0
    assert {name.split("/")[1] for name in object_store.names("history")} == {f"date={day}" for day in DAYS}
    assert not (tmp_path / "object store" / "history").exists()
