"""Reading and validating landing files: good rows kept, bad rows rejected with a reason."""

import codecs
import io
import json
import tracemalloc

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persona_pipeline.feature_schema import load_feature_schema
from persona_pipeline.ingest.ingest import ingest_days
from persona_pipeline.resources import LandingZone
from persona_pipeline_tests.conftest import update, write_file, write_jsonl

pytestmark = pytest.mark.store_agnostic

DAY = "2026-03-02"
AT = "2026-03-02T10:00:00+00:00"


def ingest(landing, day=DAY):
    return ingest_days([day], LandingZone(path=str(landing)).read_day, load_feature_schema())


GOOD = [
    update("d1", "device.location.city", "Berlin", AT, customer="c1"),
    update("d1", "device.usage.app_maps_duration", 5400, AT),
    update("d2", "device.usage.app_maps_duration", "5400", "2026-03-02T11:00:00+01:00"),
    update("d2", "device.settings.dark_mode", True, AT),
    update("d2", "device.os.build", "AP2A", AT),  # unknown to the schema: kept, counted
]

BAD = [
    (update("", "device.location.city", "Berlin", AT), "device_id is missing or empty"),
    (update("d3", None, "Berlin", AT), "key is missing or empty"),
    (update("d3", "city", "Berlin", AT), "key 'city' is not a dotted key"),
    (update("d3", "device.location.city", None, AT), "value is missing"),
    (update("d3", "device.usage.app_maps_duration", "lots", AT), "value 'lots' is not a number"),
    (update("d3", "device.battery.level", "inf", AT), "value 'inf' is not a finite number"),
    (update("d3", "device.settings.dark_mode", "maybe", AT), "value 'maybe' is not a boolean"),
    (
        update("d3", "device.location.city", "x" * 300, AT),
        "value is 300 characters long (limit 256)",
    ),
    (update("d3", "device.location.city", "Paris", None), "observed_at is missing"),
    (update("d3", "device.location.city", "Paris", "last tuesday"), "is not an ISO-8601 timestamp"),
    (update("d3", "device.location.city", "Paris", "2026-03-02T10:00:00"), "has no UTC offset"),
    (
        update("d3", "device.location.city", "Paris", "2027-01-01T00:00:00Z"),
        "is later than partition",
    ),
]


def test_mixed_file_keeps_every_good_row_and_rejects_every_bad_one_with_its_reason(landing):
    rows = [GOOD[0], BAD[0][0], GOOD[1], *[row for row, _ in BAD[1:]], *GOOD[2:]]
    write_jsonl(landing, DAY, rows)

    outcome = ingest(landing)

    assert outcome.rows_read == len(rows)
    assert len(outcome.accepted) == len(GOOD)
    assert len(outcome.rejects) == len(BAD)
    for (row, reason), got in zip(BAD, outcome.rejects.sort_values("source_row")["reason"], strict=True):
        assert reason in got, (row, got)
    assert set(outcome.rejects["source_file"]) == {f"index_updates/date={DAY}/part-0.jsonl"}
    assert outcome.rejects["raw"].str.contains('"device_id"').all()
    assert outcome.unknown_keys == {"device.os.build"}
    accepted = outcome.accepted.set_index(["device_id", "key"])
    assert accepted.loc[("d1", "device.usage.app_maps_duration"), "value"] == "5400"
    assert accepted.loc[("d2", "device.usage.app_maps_duration"), "value_number"] == 5400.0
    assert accepted.loc[("d2", "device.settings.dark_mode"), "value"] == "true"
    assert accepted.loc[("d2", "device.usage.app_maps_duration"), "observed_at"] == pd.Timestamp(
        "2026-03-02T10:00:00Z"
    )
    assert accepted.loc[("d1", "device.location.city"), "customer_id"] == "c1"


def test_exact_duplicates_are_dropped_and_counted(landing):
    write_jsonl(landing, DAY, [GOOD[0], GOOD[0], GOOD[1]], name="a.jsonl")
    write_jsonl(landing, DAY, [GOOD[0]], name="b.jsonl")
    outcome = ingest(landing)
    assert len(outcome.accepted) == 2
    assert outcome.duplicates_dropped == 2
    assert outcome.rejects.empty


def test_csv_parquet_and_jsonl_read_alike(landing):
    frame = pd.DataFrame(GOOD)
    frame["value"] = frame["value"].astype(str)
    write_file(landing, DAY, "a.csv", frame.to_csv(index=False))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame), buffer)
    write_file(landing, DAY, "b.parquet", buffer.getvalue())
    write_jsonl(landing, DAY, GOOD, name="c.jsonl")
    outcome = ingest(landing)
    assert outcome.rejects.empty
    assert len(outcome.accepted) == len(GOOD)
    assert outcome.duplicates_dropped == 2 * len(GOOD)


def test_truncated_jsonl_keeps_the_lines_before_and_after(landing):
    text = "\n".join(
        [
            '{"device_id": "d1", "key": "device.location.city", "value": "Berlin", "observed_at": "'
            + AT
            + '"}',
            '{"device_id": "d2", "key": "device.loc',
            '["not", "an", "object"]',
            '{"device_id": "d3", "key": "device.location.city", "value": "Paris", "observed_at": "'
            + AT
            + '"}',
        ]
    )
    write_file(landing, DAY, "t.jsonl", text)
    outcome = ingest(landing)
    assert sorted(outcome.accepted["device_id"]) == ["d1", "d3"]
    reasons = outcome.rejects.sort_values("source_row")
    assert reasons["source_row"].tolist() == [2, 3]
    assert "not valid JSON" in reasons["reason"].iloc[0]
    assert "expected an object" in reasons["reason"].iloc[1]


def test_non_utf8_lines_are_rejected_alone(landing):
    good = (
        '{"device_id": "d1", "key": "device.location.city", "value": "Köln", "observed_at": "' + AT + '"}'
    ).encode()
    write_file(landing, DAY, "n.jsonl", good + b"\n" + b'{"device_id": "\xff\xfe"}\n')
    outcome = ingest(landing)
    assert outcome.accepted["value"].tolist() == ["Köln"]
    assert "not valid UTF-8" in outcome.rejects["reason"].iloc[0]


def test_csv_without_a_required_column_is_one_file_reject_naming_the_column(landing):
    rows = "".join(f"d{i},device.location.city,Berlin\n" for i in range(20))
    write_file(landing, DAY, "m.csv", "device_id,key,value\n" + rows)
    outcome = ingest(landing)
    assert outcome.accepted.empty
    assert outcome.rejects["reason"].tolist() == [
        "header has no observed_at column: found 'device_id', 'key', 'value': file not read"
    ]
    assert outcome.rejects["source_row"].tolist() == [0]


def test_empty_file_and_missing_folder_are_notes_not_errors(landing):
    write_file(landing, DAY, "empty.jsonl", "")
    outcome = ingest(landing)
    assert outcome.rows_read == 0
    assert any("empty file" in p for p in outcome.problems)
    outcome = ingest(landing, day="2026-03-03")
    assert outcome.rows_read == 0
    assert any("no landing folder" in p for p in outcome.problems)


def test_parquet_with_timestamp_columns_and_wrong_types(landing):
    frame = pd.DataFrame(
        {
            "device_id": ["d1", "d2"],
            "key": ["device.battery.level", "device.battery.level"],
            "value": [55.0, 60.0],
            "observed_at": [pd.Timestamp(AT), pd.Timestamp("2026-03-02T12:00:00")],  # aware, naive
        }
    )
    frame["observed_at"] = frame["observed_at"].astype(object)
    buffer = io.BytesIO()
    table = pa.table(
        {
            "device_id": frame["device_id"],
            "key": frame["key"],
            "value": frame["value"],
            "observed_at": pa.array(
                [
                    pd.Timestamp(AT).to_pydatetime(),
                    pd.Timestamp("2026-03-02T12:00:00Z").to_pydatetime(),
                ],
                type=pa.timestamp("us", tz="UTC"),
            ),
        }
    )
    pq.write_table(table, buffer)
    write_file(landing, DAY, "typed.parquet", buffer.getvalue())
    wrong = io.BytesIO()
    pq.write_table(
        pa.table({"device_id": [1], "key": ["device.battery.level"], "value": [1.0], "observed_at": [17]}),
        wrong,
    )
    write_file(landing, DAY, "wrong.parquet", wrong.getvalue())
    write_file(landing, DAY, "broken.parquet", b"PAR1 not really")

    outcome = ingest(landing)
    assert sorted(outcome.accepted["device_id"]) == ["d1", "d2"]
    reasons = " | ".join(outcome.rejects["reason"])
    assert "observed_at '17' is not an ISO-8601 timestamp" in reasons
    assert "not a readable Parquet file" in reasons


def test_misnamed_date_folders_are_reported_and_never_read(landing):
    write_jsonl(landing, "2026-02-30", [GOOD[0]])
    write_jsonl(landing, "yesterday", [GOOD[0]])
    zone = LandingZone(path=str(landing))
    assert zone.landed_days() == []
    assert zone.misnamed_folders() == ["date=2026-02-30", "date=yesterday"]


@pytest.mark.parametrize("column_type", ["text", "timestamp"])
def test_sql_source_selects_the_rows_of_the_partition_day(tmp_path, column_type):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'source.db'}"
    engine = sa.create_engine(url)
    observed = sa.Text if column_type == "text" else sa.DateTime(timezone=True)
    source = sa.Table(
        "index_updates",
        sa.MetaData(),
        sa.Column("device_id", sa.Text),
        sa.Column("key", sa.Text),
        sa.Column("value", sa.Text),
        sa.Column("observed_at", observed),
    )
    source.create(engine)
    stamps = [
        "2026-03-01T23:30:00+00:00",
        "2026-03-02T00:30:00+01:00",
        "2026-03-02T10:00:00+00:00",
        "2026-03-03T00:00:00+00:00",
    ]
    with engine.begin() as connection:
        connection.execute(
            source.insert(),
            [
                {
                    "device_id": f"d{i}",
                    "key": "device.location.city",
                    "value": "Berlin",
                    "observed_at": s
                    if column_type == "text"
                    else pd.Timestamp(s).tz_convert("UTC").to_pydatetime(),
                }
                for i, s in enumerate(stamps)
            ],
        )
    zone = LandingZone(path=str(tmp_path / "unused"), source_db_url=url)
    outcome = ingest_days([DAY], zone.read_day, load_feature_schema())
    # 00:30+01:00 on the 2nd is 23:30 UTC on the 1st: it belongs to the 1st.
    assert sorted(outcome.accepted["device_id"]) == ["d2"]


def test_a_bare_date_is_not_a_timestamp_with_offset(landing):
    write_jsonl(landing, DAY, [update("d1", "device.location.city", "Berlin", "2026-03-02")])
    outcome = ingest(landing)
    assert outcome.accepted.empty
    assert "has no UTC offset" in outcome.rejects["reason"].iloc[0]


def test_numbers_read_the_same_from_every_format(landing):
    write_jsonl(landing, DAY, [update("d1", "device.model", 15, AT)], name="a.jsonl")
    write_file(landing, DAY, "b.csv", f"device_id,key,value,observed_at\nd1,device.model,15,{AT}\n")
    outcome = ingest(landing)
    assert outcome.accepted["value"].tolist() == ["15"]
    assert outcome.duplicates_dropped == 1


def test_timestamps_keep_microseconds_like_the_stores(landing):
    write_jsonl(landing, DAY, [update("d1", "device.model", "x", "2026-03-02T10:00:00.123456789+00:00")])
    stamp = ingest(landing).accepted["observed_at"].iloc[0]
    assert stamp == pd.Timestamp("2026-03-02T10:00:00.123456Z")


def good_line(device: str) -> str:
    return json.dumps(update(device, "device.location.city", "Berlin", AT))


@pytest.mark.parametrize(
    "huge",
    [
        json.dumps(update("dx", "device.location.city", "x" * 10_000_000, AT)),  # one enormous value
        json.dumps({f"field_{i}": i for i in range(800_000)} | update("dx", "device.model", "x", AT)),
        "y" * 10_000_000,  # not JSON at all
    ],
    ids=["value", "fields", "garbage"],
)
def test_a_10_mb_line_is_rejected_unread_and_memory_stays_near_the_file_size(landing, huge):
    lines = [good_line(f"d{i}") for i in range(1_000)]
    path = write_file(landing, DAY, "big.jsonl", "\n".join([*lines[:500], huge, *lines[500:]]) + "\n")

    tracemalloc.start()
    try:
        outcome = ingest(landing)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 5 * path.stat().st_size
    assert len(outcome.accepted) == 1_000
    (reject,) = outcome.rejects.itertuples()
    assert (reject.source_file, reject.source_row) == (f"index_updates/date={DAY}/big.jsonl", 501)
    assert f"line is {len(huge.encode()):,} bytes long (limit 65,536): not read" == reject.reason
    assert len(reject.raw) < 2_100 and reject.raw.startswith(huge[:100])


def test_a_10_mb_csv_cell_is_rejected_alone(landing):
    rows = [f"d{i},device.location.city,Berlin,{AT}" for i in range(1_000)]
    rows.insert(500, f"dx,device.location.city,{'z' * 10_000_000},{AT}")
    write_file(landing, DAY, "big.csv", "device_id,key,value,observed_at\n" + "\n".join(rows) + "\n")
    outcome = ingest(landing)
    assert len(outcome.accepted) == 1_000
    (reject,) = outcome.rejects.itertuples()
    assert reject.source_row == 501 and "bytes long (limit 65,536): not read" in reject.reason
    assert len(reject.raw) < 2_100


def test_csv_rows_keep_their_numbers_around_broken_lines(landing):
    lines = [
        "device_id,key,value,observed_at",
        f"d1,device.location.city,Berlin,{AT}",
        f'd2,device.location.city,"Ber,{AT}',  # unclosed quote: must not swallow d3
        f"d3,device.location.city,Berlin,{AT}",
        f"d4,device.location.city,Berlin,{AT},extra,fields",
        "",
        f"d5,device.location.city,Berlin,{AT}",
    ]
    text = "\n".join(lines).encode() + b"\n" + f"d6,device.location.city,K\xf6ln,{AT}\n".encode("latin-1")
    write_file(landing, DAY, "broken.csv", text + f"d7,device.location.city,Köln,{AT}\n".encode())
    outcome = ingest(landing)
    accepted = outcome.accepted.set_index("device_id")["source_row"].to_dict()
    assert accepted == {"d1": 1, "d3": 3, "d5": 6, "d7": 8}  # data rows; the header is row 0
    rejects = outcome.rejects.set_index("source_row")["reason"].to_dict()
    assert rejects == {
        2: "row has an unclosed quote",
        4: "row has 6 fields, the header has 4",
        7: "line is not valid UTF-8 (byte 25)",
    }


def test_a_byte_order_mark_is_not_data_and_utf16_files_are_rejected_readably(landing):
    rows = [update(f"d{i}", "device.location.city", "Köln", AT) for i in range(3)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_file(landing, DAY, "bom.jsonl", codecs.BOM_UTF8 + text.encode())
    write_file(landing, DAY, "wide.jsonl", text.encode("utf-16"))
    write_file(
        landing, DAY, "wide.csv", "device_id,key,value,observed_at\nd9,device.model,x,{AT}\n".encode("utf-16")
    )
    outcome = ingest(landing)
    assert sorted(outcome.accepted["device_id"]) == ["d0", "d1", "d2"]  # from bom.jsonl, row 1 included
    rejects = outcome.rejects.sort_values(["source_file", "source_row"])
    assert rejects["source_row"].tolist() == [1, 1, 2, 3]
    assert rejects["reason"].str.startswith("file is UTF-16 text").all()
    assert rejects["raw"].iloc[1] == json.dumps(rows[0], ensure_ascii=False)  # readable, not bytes


def test_nul_characters_are_rejected_before_they_reach_a_store(landing):
    write_jsonl(landing, DAY, [update("d\u0000", "device.location.city", "Berlin", AT), GOOD[0]])
    outcome = ingest(landing)
    assert outcome.accepted["device_id"].tolist() == ["d1"]
    (reject,) = outcome.rejects.itertuples()
    assert reject.reason == "device_id contains a NUL character (\\u0000)"
    assert "\x00" not in reject.raw


def test_parquet_columns_of_nested_or_binary_types_reject_their_rows(landing):
    at = [AT, AT, AT]
    tables = {
        "nested.parquet": pa.table(
            {
                "device_id": ["n1", "n2", "n3"],
                "key": ["device.location.city"] * 3,
                "value": pa.array([["Berlin"], None, ["a", "b"]], pa.list_(pa.string())),
                "observed_at": at,
            }
        ),
        "binary.parquet": pa.table(
            {
                "device_id": pa.array([b"b1", b"b2\xff", b"b3"], pa.binary()),
                "key": ["device.location.city"] * 3,
                "value": ["Berlin"] * 3,
                "observed_at": at,
            }
        ),
    }
    for name, contents in tables.items():
        buffer = io.BytesIO()
        pq.write_table(contents, buffer)
        write_file(landing, DAY, name, buffer.getvalue())
    outcome = ingest(landing)
    assert sorted(outcome.accepted["device_id"]) == ["b1", "b3"]
    rejects = outcome.rejects.set_index(["source_file", "source_row"])["reason"]
    folder = f"index_updates/date={DAY}"
    assert rejects[(f"{folder}/nested.parquet", 1)].startswith("value is a Parquet list<")
    assert rejects[(f"{folder}/nested.parquet", 2)] == "value is missing"
    assert rejects[(f"{folder}/binary.parquet", 2)] == "device_id is binary data, not UTF-8 text"
    assert len(rejects) == 4


@pytest.mark.parametrize("repeated", [3, 1_500])
def test_duplicates_across_files_are_dropped_keeping_the_first_read(landing, repeated):
    """A few duplicates are cut out of the day by slicing around them, many by a filtered copy:
    either way the first row read stays, in the order read, and the rest are counted."""
    first = [update(f"d{i}", "device.location.city", "Berlin", AT) for i in range(2_000)]
    later = [update(f"e{i}", "device.location.city", "Paris", AT) for i in range(5)]
    write_jsonl(landing, DAY, first, name="a.jsonl")
    write_jsonl(landing, DAY, [*first[:repeated], *later, *first[-repeated:]], name="b.jsonl")

    outcome = ingest(landing)

    expected = [f"d{i}" for i in range(2_000)] + [f"e{i}" for i in range(5)]
    assert outcome.accepted["device_id"].tolist() == expected
    assert outcome.duplicates_dropped == 2 * repeated
    b_rows = outcome.accepted.loc[outcome.accepted["source_file"].str.endswith("b.jsonl"), "source_row"]
    assert b_rows.astype(int).tolist() == list(range(repeated + 1, repeated + 6))


def test_a_days_columns_stay_typed_whether_read_at_once_or_file_by_file(landing):
    """The first part read is the folder's skipped entries, empty, with plain object columns;
    joined with the files' parts it turned the day's text and row-number columns into Python
    objects (at 10M rows, gigabytes more)."""
    write_jsonl(landing, DAY, GOOD[:3], name="a.jsonl")
    write_jsonl(landing, DAY, GOOD[3:], name="b.jsonl")
    zone = LandingZone(path=str(landing))
    at_once = ingest_days([DAY], zone.read_day, load_feature_schema()).accepted
    file_by_file = ingest_days([DAY], zone.read_day_files, load_feature_schema()).accepted
    assert file_by_file.dtypes.to_dict() == at_once.dtypes.to_dict()
    assert file_by_file.equals(at_once)
    assert file_by_file["source_file"].dtype != object
    assert pd.api.types.is_integer_dtype(file_by_file["source_row"])


def test_rows_whose_hashes_collide_are_kept_unless_equal(landing, monkeypatch):
    """Duplicates are found by a hash of the row, then compared whole: with every hash the same,
    only the rows equal to an earlier one go."""
    monkeypatch.setattr(
        pd.util,
        "hash_pandas_object",
        lambda frame, index=False: pd.Series(0, index=frame.index, dtype="uint64"),
    )
    write_jsonl(landing, DAY, [GOOD[0], GOOD[1], GOOD[0], GOOD[2]], name="a.jsonl")
    outcome = ingest(landing)
    assert outcome.duplicates_dropped == 1
    assert outcome.accepted["source_row"].astype(int).tolist() == [1, 2, 4]
