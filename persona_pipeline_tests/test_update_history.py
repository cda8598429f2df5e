"""The update history: the accepted updates as Parquet per day and shard beside the persona store,
written atomically, read by every reader, moved there from an older store's table."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from alembic import command

from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.ingest.storage import count_accepted
from persona_pipeline.personas import storage
from persona_pipeline.personas.assets import device_profiles
from persona_pipeline.resources import PersonaStore
from persona_pipeline.resources import update_history as history_module
from persona_pipeline.resources.update_history import (
    LOCK_NAME,
    SCHEMA,
    HistoryError,
    UpdateHistory,
    shard_of,
)
from persona_pipeline.store import tables
from persona_pipeline.store.schema import alembic_config, current_revision, head_revision
from persona_pipeline_tests.conftest import store_url, table, update, write_jsonl

DAYS = ["2026-03-01", "2026-03-02"]
CITY = "device.location.city"


def ingest(resources, instance, day: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [index_updates, device_profiles], resources=resources, instance=instance, partition_key=day
    )


def history_files(root: Path) -> list[str]:
    """Every file under the history's root but its lock, relative to it (temporary ones included)."""
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.name != LOCK_NAME
    )


def test_a_day_is_one_file_in_its_folder_and_a_rerun_replaces_it(landing, resources, instance):
    rows = [update(f"d{n}", CITY, "Berlin", f"{DAYS[0]}T10:00:0{n}Z", customer=f"c{n}") for n in range(4)]
    write_jsonl(landing, DAYS[0], rows)
    assert ingest(resources, instance, DAYS[0]).success
    store: PersonaStore = resources["persona_store"]
    root = Path(store.history.root)
    assert root == landing.parent / "history"  # $PERSONA_HOME/history by default
    assert history_files(root) == [f"index_updates/date={DAYS[0]}/shard=0/part-0.parquet"]
    written = pq.read_table(root / history_files(root)[0])
    assert written.schema.equals(SCHEMA)
    assert written.num_rows == 4
    assert table(store, "index_updates").empty  # the table is no longer written

    write_jsonl(landing, DAYS[0], rows[:3])  # the day's file changed upstream: ingested again
    assert ingest(resources, instance, DAYS[0]).success
    assert ingest(resources, instance, DAYS[0]).success
    assert history_files(root) == [f"index_updates/date={DAYS[0]}/shard=0/part-0.parquet"]
    assert sorted(store.history.read()["device_id"]) == ["d0", "d1", "d2"]


def test_a_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    history = UpdateHistory(tmp_path)
    history.write_days([DAYS[0]], updates_frame(DAYS[0], ["a", "b"]))
    before = history.read()

    class BrokenWriter:
        """Writes half a file, then the disk is full."""

        def __init__(self, where, schema, **_):
            self.where = where

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

        def write_table(self, table, **_):
            Path(self.where).write_bytes(b"PAR1 half a file")
            raise OSError("disk full")

    monkeypatch.setattr(history_module.pq, "ParquetWriter", BrokenWriter)
    with pytest.raises(OSError, match="disk full"):
        history.write_days([DAYS[0]], updates_frame(DAYS[0], ["c"]))
    pd.testing.assert_frame_equal(history.read(), before)
    assert history_files(tmp_path) == [f"index_updates/date={DAYS[0]}/shard=0/part-0.parquet"]


def test_devices_keep_their_shard_and_fewer_shards_leave_no_old_files(tmp_path):
    devices = [f"dev-{n}" for n in range(200)]
    four = UpdateHistory(tmp_path, shards=4)
    four.write_days([DAYS[0]], updates_frame(DAYS[0], devices))
    shards = shard_of(pd.Series(devices), 4)
    assert shard_of(pd.Series(devices[::-1]), 4).tolist() == shards[::-1].tolist()  # per device
    assert sorted(set(shards.tolist())) == [0, 1, 2, 3]
    for shard in range(4):
        path = tmp_path / f"index_updates/date={DAYS[0]}/shard={shard}/part-0.parquet"
        expected = sorted(d for d, s in zip(devices, shards, strict=True) if s == shard)
        assert sorted(pq.read_table(path).column("device_id").to_pylist()) == expected
    assert four.count_by_day([DAYS[0]]).tolist() == [200]

    UpdateHistory(tmp_path, shards=1).write_days([DAYS[0]], updates_frame(DAYS[0], devices))
    assert history_files(tmp_path) == [f"index_updates/date={DAYS[0]}/shard=0/part-0.parquet"]
    assert len(UpdateHistory(tmp_path).read()) == 200


def test_the_readers_read_the_history(landing, resources, instance):
    write_jsonl(
        landing,
        DAYS[0],
        [
            update("d1", CITY, "Berlin", f"{DAYS[0]}T08:00:00Z", customer="c1"),
            update("d2", CITY, "Paris", f"{DAYS[0]}T08:00:00Z"),
            update("d3", CITY, "Rome", f"{DAYS[0]}T08:00:00Z"),
            update("d1", "device.usage.app_maps_duration", 600, f"{DAYS[0]}T09:00:00Z"),
        ],
    )
    write_jsonl(
        landing,
        DAYS[1],
        [
            update("d1", CITY, "Munich", f"{DAYS[1]}T08:00:00Z", customer="c1"),
            update("d2", CITY, "Paris", f"{DAYS[1]}T09:00:00Z"),
        ],
    )
    for day in DAYS:
        assert ingest(resources, instance, day).success
    store: PersonaStore = resources["persona_store"]

    updates = storage.read_updates_for_days(store, [DAYS[1]])
    assert sorted(updates["device_id"]) == ["d1", "d2"]
    assert str(updates["observed_at"].dtype) == "datetime64[us, UTC]"
    counts = storage.count_updates_by_day(store, [*DAYS, "2026-03-03"])
    assert counts["updates_read"].to_dict() == {DAYS[0]: 4, DAYS[1]: 2, "2026-03-03": 0}
    assert count_accepted(store, DAYS) == 6

    since = pd.Timestamp(f"{DAYS[1]}T00:00:00Z")
    history = storage.read_key_history(store, CITY, since.to_pydatetime())
    got = history.sort_values(["device_id", "observed_at"])[["device_id", "value"]].values.tolist()
    # Each device updated after `since`, with its last value before; d3 said nothing since.
    assert got == [["d1", "Berlin"], ["d1", "Munich"], ["d2", "Paris"], ["d2", "Paris"]]
    profiles = table(store, "device_profiles").set_index(["device_id", "key"])["value"]
    assert profiles[("d1", CITY)] == "Munich" and profiles[("d3", CITY)] == "Rome"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not parquet at all", "not a readable Parquet file of the update history"),
        ("foreign", "not a file of the update history: lacks or mistypes partition_date"),
    ],
)
def test_a_bad_file_in_the_history_is_one_line_naming_it(landing, resources, instance, content, problem):
    write_jsonl(landing, DAYS[0], [update("d1", CITY, "Berlin", f"{DAYS[0]}T08:00:00Z")])
    assert ingest(resources, instance, DAYS[0]).success
    history = resources["persona_store"].history
    bad = Path(history.day_folder(DAYS[0])) / "shard=1" / "part-0.parquet"
    bad.parent.mkdir()
    if content == "foreign":
        pq.write_table(pa.table({"device_id": ["x"], "something": [1]}), bad)
    else:
        bad.write_bytes(content)

    with pytest.raises(HistoryError) as raised:
        history.read([DAYS[0]])
    message = str(raised.value)
    assert message.startswith(f"{bad}: {problem}") and "\n" not in message
    result = dg.materialize(
        [device_profiles], resources=resources, instance=instance, partition_key=DAYS[0], raise_on_error=False
    )
    assert not result.success
    assert str(bad) in result.failure_data_for_node("device_profiles").error.message
    # The good file is still there, whole.
    assert pq.read_table(Path(history.day_folder(DAYS[0])) / "shard=0" / "part-0.parquet").num_rows == 1


def test_a_day_is_written_in_key_order_across_batches_in_whole_row_groups(tmp_path, monkeypatch):
    """The file is sorted a batch of rows at a time (the day is never held twice): the order must
    still be the whole file's, and the row groups as wide as a write of the whole table makes."""
    monkeypatch.setattr(history_module, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(history_module, "WRITE_BATCH_ROWS", 8)
    devices = [f"dev-{n:02d}" for n in range(30)]
    frame = pd.concat(
        [updates_frame(DAYS[0], devices), updates_frame(DAYS[0], devices).assign(key="device.a")]
    )
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    UpdateHistory(tmp_path).write_days([DAYS[0]], shuffled)

    written = pq.ParquetFile(tmp_path / f"index_updates/date={DAYS[0]}/shard=0/part-0.parquet")
    rows = written.read().to_pandas()
    assert list(zip(rows["key"], rows["device_id"], strict=True)) == sorted(
        zip(frame["key"], frame["device_id"], strict=True)
    )
    sizes = [written.metadata.row_group(group).num_rows for group in range(written.num_row_groups)]
    assert sizes == [4] * 15


def test_erasure_rewrites_only_the_files_holding_the_devices(tmp_path):
    history = UpdateHistory(tmp_path)
    history.write_days(DAYS, pd.concat([updates_frame(DAYS[0], ["a", "b"]), updates_frame(DAYS[1], ["c"])]))
    untouched = Path(history.day_folder(DAYS[1])) / "shard=0" / "part-0.parquet"
    stamp = untouched.stat().st_mtime_ns
    assert history.devices_of_customers(["customer-of-a"]) == {"a"}
    assert history.remove_devices(["a"]) == 1
    assert sorted(history.read()["device_id"]) == ["b", "c"]
    assert untouched.stat().st_mtime_ns == stamp
    assert history.remove_devices(["a"]) == 0


@pytest.mark.parametrize("moved_by", ["first use", "persona-pipeline migrate"])
def test_an_older_store_moves_its_rows_to_the_history(persona_home, moved_by, capsys):
    persona_home.mkdir(parents=True)
    url = store_url(persona_home)
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0009_anomaly_norms")
        connection.execute(
            tables.index_updates.insert(),
            [
                {
                    "partition_date": day,
                    "device_id": device,
                    "customer_id": "c1" if device == "d1" else None,
                    "key": CITY,
                    "value": city,
                    "value_number": None,
                    "observed_at": pd.Timestamp(f"{day}T10:00:00.123456Z").to_pydatetime(),
                    "source_file": f"index_updates/date={day}/part-0.jsonl",
                    "source_row": row,
                }
                for row, (day, device, city) in enumerate(
                    [(DAYS[0], "d1", "Berlin"), (DAYS[0], "d2", "Rome"), (DAYS[1], "d1", "Munich")], start=1
                )
            ],
        )
    engine.dispose()

    if moved_by == "persona-pipeline migrate":
        from persona_pipeline.app.cli import main

        assert main(["migrate"]) == 0
        printed = capsys.readouterr().out
        assert f"update history {persona_home / 'history' / 'index_updates'}: 2 days" in printed
        assert UpdateHistory(persona_home / "history").count_by_day(DAYS).tolist() == [2, 1]
    store = PersonaStore(url=url)
    moved = store.history.read().sort_values(["partition_date", "device_id"]).reset_index(drop=True)
    moved["customer_id"] = moved["customer_id"].fillna("none")
    assert moved[["partition_date", "device_id", "customer_id", "value", "source_row"]].values.tolist() == [
        [DAYS[0], "d1", "c1", "Berlin", 1],
        [DAYS[0], "d2", "none", "Rome", 2],
        [DAYS[1], "d1", "c1", "Munich", 3],
    ]
    assert moved["observed_at"].iloc[0] == pd.Timestamp(f"{DAYS[0]}T10:00:00.123456Z")
    assert table(store, "index_updates").empty
    with store.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    assert store.history.count_by_day(DAYS).tolist() == [2, 1]
    assert PersonaStore(url=url, history_dir=str(store.history.root)).history.count_by_day(DAYS).tolist() == [
        2,
        1,
    ]


def test_the_history_settings_are_checked(monkeypatch, tmp_path):
    from persona_pipeline import settings

    monkeypatch.setenv("PERSONA_HISTORY_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PERSONA_HISTORY_SHARDS", "8")
    assert settings.history_location() == str(tmp_path / "elsewhere")
    assert settings.history_shards() == 8
    monkeypatch.setenv("PERSONA_HISTORY_SHARDS", "0")
    with pytest.raises(
        ValueError, match=r"^PERSONA_HISTORY_SHARDS='0': expected a whole number from 1 to 1024$"
    ):
        settings.history_shards()


def updates_frame(day: str, devices: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "partition_date": day,
            "device_id": devices,
            "customer_id": [f"customer-of-{device}" for device in devices],
            "key": CITY,
            "value": "Berlin",
            "value_number": None,
            "observed_at": pd.Timestamp(f"{day}T10:00:00Z"),
            "source_file": "part-0.jsonl",
            "source_row": range(1, len(devices) + 1),
        }
    )


def test_the_lock_is_held_once_per_process_and_released(tmp_path):
    import fcntl

    history = UpdateHistory(tmp_path)
    with history.exclusive(), history.exclusive():  # the move writes a day while holding it
        history.write_days([DAYS[0]], updates_frame(DAYS[0], ["a"]))
        # Another holder (another open file, as another process has) is refused meanwhile.
        with open(Path(history.folder) / LOCK_NAME, "a+b") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(Path(history.folder) / LOCK_NAME, "a+b") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
