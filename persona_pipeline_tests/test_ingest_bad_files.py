"""Bad landing files through the index_updates asset: the good rows land, each bad row lands in
index_update_rejects naming its file, row and reason, and the run's metadata and log say so.
Run on SQLite and, where one is running, on the loopback PostgreSQL (which stores no NUL)."""

import io
import json

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persona_pipeline.ingest.assets import REJECT_SHARE_CHECK, index_updates
from persona_pipeline.personas.assets import device_profiles
from persona_pipeline.resources import PersonaStore
from persona_pipeline_tests.conftest import (
    accepted_updates,
    check_named,
    table,
    update,
    write_file,
    write_jsonl,
)

# Both backends are parametrized inside.
pytestmark = pytest.mark.store_agnostic

DAY = "2026-03-02"
AT = f"{DAY}T10:00:00Z"
FOLDER = f"index_updates/date={DAY}"
HUGE = "x" * 10_000_000


def line(device: str, value: object = "Berlin", key: str = "device.location.city") -> str:
    return json.dumps(update(device, key, value, AT), ensure_ascii=False)


def parquet(columns: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


FILES: dict[str, bytes | str] = {
    "good.jsonl": "\n".join(line(d) for d in ("d1", "d2", "d3")) + "\n",
    "truncated.jsonl": line("d4") + '\n{"device_id": "d5", "key": "device.loc',
    "missing_column.csv": "device_id,key,value\nd6,device.location.city,Berlin\n",
    "empty.jsonl": "",
    "latin1.csv": f"device_id,key,value,observed_at\nd7,device.location.city,Berlin,{AT}\n".encode()
    + f"d8,device.location.city,Köln,{AT}\n".encode("latin-1"),
    "utf16.jsonl": (line("d9") + "\n").encode("utf-16"),
    "huge.jsonl": line("d10") + "\n" + line("d11", HUGE) + "\n",
    "huge_cell.csv": f"device_id,key,value,observed_at\nd12,device.location.city,{HUGE},{AT}\n",
    "wrong_types.parquet": parquet(
        {
            "device_id": ["d13", "d14", "d15"],
            "key": ["device.battery.level"] * 3,
            "value": pa.array([[55.0], [60.0], None], pa.list_(pa.float64())),
            "observed_at": [17, 18, 19],
        }
    ),
    "nul.jsonl": line("d16\u0000") + "\n",
}
# (file, row) -> the start of the reason
REJECTED = {
    ("truncated.jsonl", 2): "line is not valid JSON (truncated or malformed)",
    ("missing_column.csv", 0): "header has no observed_at column: found 'device_id', 'key', 'value'",
    ("latin1.csv", 2): "line is not valid UTF-8",
    ("utf16.jsonl", 1): "file is UTF-16 text",
    ("huge.jsonl", 2): f"line is {len(line('d11', HUGE).encode()):,} bytes long (limit 65,536): not read",
    ("huge_cell.csv", 1): f"line is {len(f'd12,device.location.city,{HUGE},{AT}'):,} bytes long",
    ("wrong_types.parquet", 1): "value is a Parquet list<",
    ("wrong_types.parquet", 2): "value is a Parquet list<",
    ("wrong_types.parquet", 3): "value is missing",
    ("nul.jsonl", 1): "device_id contains a NUL character",
}
ACCEPTED = ["d1", "d10", "d2", "d3", "d4", "d7"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_resources(request, resources) -> dict[str, dg.ConfigurableResource]:
    if request.param == "sqlite":
        return resources
    url = request.getfixturevalue("postgres_database")()
    return {**resources, "persona_store": PersonaStore(url=url)}


def test_bad_files_lose_no_good_row_and_every_bad_row_has_a_reason(landing, store_resources, instance):
    for name, content in FILES.items():
        write_file(landing, DAY, name, content)
    write_jsonl(landing, "2026-02-30", [update("never", "device.location.city", "Berlin", AT)])
    write_jsonl(landing, "yesterday", [update("never", "device.location.city", "Berlin", AT)])

    result = dg.materialize(
        [index_updates, device_profiles], resources=store_resources, instance=instance, partition_key=DAY
    )

    assert result.success
    store = store_resources["persona_store"]
    assert sorted(accepted_updates(store)["device_id"]) == ACCEPTED
    assert sorted(table(store, "device_profiles")["device_id"].unique()) == ACCEPTED
    rejects = table(store, "index_update_rejects")
    found = {
        (source.removeprefix(f"{FOLDER}/"), row): reason
        for source, row, reason in zip(
            rejects["source_file"], rejects["source_row"], rejects["reason"], strict=True
        )
    }
    assert sorted(found) == sorted(REJECTED)
    for where, reason in REJECTED.items():
        assert found[where].startswith(reason), (where, found[where])
    assert (rejects["partition_date"] == DAY).all()
    assert rejects["raw"].str.len().max() < 2_100  # the 10 MB rows are stored as their start
    assert rejects["raw"].str.len().min() > 0

    metadata = result.asset_materializations_for_node("index_updates")[0].metadata
    assert metadata["rows_accepted"].value == len(ACCEPTED)
    assert metadata["rows_rejected"].value == len(REJECTED)
    assert metadata["rows_read"].value == len(ACCEPTED) + len(REJECTED)
    notes = metadata["file_notes"].value
    assert f"{FOLDER}/empty.jsonl: empty file" in notes
    check = check_named(result, REJECT_SHARE_CHECK)
    assert check.check_name == REJECT_SHARE_CHECK and not check.passed

    warnings = [
        record.user_message
        for record in instance.all_logs(result.run_id)
        if record.level == 30 and "landing folder" in record.user_message
    ]
    assert warnings == [
        "landing folder index_updates/date=2026-02-30 is not date=YYYY-MM-DD: never read",
        "landing folder index_updates/date=yesterday is not date=YYYY-MM-DD: never read",
    ]
