"""The landing zone's edges: folders and files that must be reported, never followed or read
blindly, and never stop the rest of the landing zone."""

import gzip
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persona_pipeline.feature_schema import load_feature_schema
from persona_pipeline.ingest.ingest import ingest_days
from persona_pipeline.resources import LandingZone, landing_files
from persona_pipeline.resources.landing_zone import check_batch_id, is_valid_batch_id
from persona_pipeline_tests.conftest import update, write_file, write_jsonl

pytestmark = pytest.mark.store_agnostic


def feedback_batch(landing: Path, folder: str, complete: bool = True) -> Path:
    path = landing / "offer_feedback" / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "part-0.csv").write_text("offer_id,response,responded_at\n", encoding="utf-8")
    if complete:
        (path / "_SUCCESS").touch()
    return path


@pytest.mark.parametrize("batch_id", ["b1", "sim-2026-03-02-1", "A.b_c-9", "x" * 100])
def test_batch_ids_that_are_safe_partition_keys_pass(batch_id):
    assert is_valid_batch_id(batch_id)
    assert check_batch_id(batch_id) == batch_id


@pytest.mark.parametrize(
    "batch_id",
    ["", "..", "../../x", "a/b", "a..b", ".hidden", "-dash", "b 1", "b\n1", "x" * 101, "bätch"],
)
def test_batch_ids_unsafe_in_paths_or_as_partition_keys_are_refused_in_one_line(batch_id):
    assert not is_valid_batch_id(batch_id)
    with pytest.raises(ValueError) as error:
        check_batch_id(batch_id)
    message = str(error.value)
    assert "\n" not in message and message.startswith("batch id ")


def test_bad_feedback_batch_folders_are_skipped_and_named_while_good_ones_go_on(landing, tmp_path):
    feedback_batch(landing, "batch=b1")
    feedback_batch(landing, "batch=")
    feedback_batch(landing, "batch=bad id")
    feedback_batch(landing, "batch=b2", complete=False)  # still being written: not a problem
    feedback_batch(landing, "batches-2026")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "_SUCCESS").touch()
    (landing / "offer_feedback" / "batch=escaped").symlink_to(outside, target_is_directory=True)
    (landing / "offer_feedback" / "batch=file").write_text("not a folder", encoding="utf-8")

    zone = LandingZone(path=str(landing))

    assert zone.complete_feedback_batches() == ["b1"]
    problems = zone.feedback_folder_problems()
    assert len(problems) == 5, problems
    by_folder = {line.split(":")[0]: line for line in problems}
    assert "batch id '' is empty" in by_folder["offer_feedback/batch="]
    assert "batch id 'bad id'" in by_folder["offer_feedback/batch=bad id"]
    assert "not named batch=<id>" in by_folder["offer_feedback/batches-2026"]
    assert "outside the landing zone" in by_folder["offer_feedback/batch=escaped"]
    assert str(outside) not in by_folder["offer_feedback/batch=escaped"]
    assert "not a folder" in by_folder["offer_feedback/batch=file"]


def test_reading_an_unsafe_batch_id_is_refused(landing):
    zone = LandingZone(path=str(landing))
    with pytest.raises(ValueError, match=r"batch id '\.\./x'"):
        zone.read_feedback_batch("../x")


def test_a_batch_of_one_header_only_file_reads_as_no_rows_with_the_feedback_columns(landing):
    """Empty parts are left out of a read only while some part has rows: with none, the
    feedback file's columns stay beside the skipped entries' columns."""
    feedback_batch(landing, "batch=b1")
    read = LandingZone(path=str(landing)).read_feedback_batch("b1")
    assert read.rows.empty
    assert {"offer_id", "response", "responded_at"} <= set(read.rows.columns)


DAY = "2026-03-02"
AT = f"{DAY}T10:00:00Z"
FOLDER = f"index_updates/date={DAY}"


def ingest(landing: Path, day: str = DAY):
    return ingest_days([day], LandingZone(path=str(landing)).read_day_files, load_feature_schema())


def rejects_by_file(outcome) -> dict[str, str]:
    return dict(zip(outcome.rejects["source_file"], outcome.rejects["reason"], strict=True))


def jsonl(*devices: str) -> str:
    return "".join(json.dumps(update(d, "device.location.city", "Berlin", AT)) + "\n" for d in devices)


def test_symlinks_out_of_the_landing_zone_are_refused_without_reading_them(landing, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 31, encoding="utf-8")
    write_file(landing, DAY, "good.jsonl", jsonl("d1"))
    (landing / FOLDER / "evil.jsonl").symlink_to(secret)
    inside = write_file(landing, "2026-03-01", "other.jsonl", jsonl("d2"))
    (landing / FOLDER / "linked.jsonl").symlink_to(inside)  # a link within the zone is read
    outside_day = tmp_path / "outside_day"
    outside_day.mkdir()
    (outside_day / "part-0.jsonl").write_text(jsonl("d3"), encoding="utf-8")
    (landing / "index_updates" / "date=2026-03-03").symlink_to(outside_day, target_is_directory=True)

    outcome = ingest(landing)
    elsewhere = ingest(landing, "2026-03-03")

    assert sorted(outcome.accepted["device_id"]) == ["d1", "d2"]
    found = rejects_by_file(outcome)
    assert list(found) == [f"{FOLDER}/evil.jsonl"]
    assert "outside the landing zone" in found[f"{FOLDER}/evil.jsonl"]
    assert (outcome.rejects["raw"].fillna("") == "").all()
    assert "root:" not in outcome.rejects.to_csv()
    assert elsewhere.accepted.empty
    assert list(rejects_by_file(elsewhere)) == ["index_updates/date=2026-03-03"]
    assert "outside the landing zone" in elsewhere.rejects["reason"].iloc[0]
    assert str(tmp_path) not in " ".join(elsewhere.rejects["reason"])


def test_feedback_files_that_link_out_of_the_zone_are_rejected_not_read(landing, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    folder = feedback_batch(landing, "batch=b1")
    (folder / "evil.csv").symlink_to(secret)

    read = LandingZone(path=str(landing)).read_feedback_batch("b1")

    assert read.rows.empty
    assert list(read.rejects["source_file"]) == ["offer_feedback/batch=b1/evil.csv"]
    assert "outside the landing zone" in read.rejects["reason"].iloc[0]
    assert (read.rejects["raw"] == "").all()


def test_files_never_read_are_each_a_file_reject_with_the_reason(landing):
    write_file(landing, DAY, "good.jsonl", jsonl("d1"))
    write_file(landing, DAY, "notes.txt", "hello")
    write_file(landing, DAY, "export.jsonl.zip", b"PK")
    (landing / FOLDER / "sub" / "deeper").mkdir(parents=True)
    (landing / FOLDER / "sub" / "part-1.jsonl").write_text(jsonl("d2"), encoding="utf-8")
    (landing / FOLDER / "sub" / "deeper" / "part-2.csv").write_text("device_id\n", encoding="utf-8")
    write_file(landing, DAY, "_SUCCESS", "")
    write_file(landing, DAY, ".part-3.jsonl.tmp", jsonl("d3"))  # hidden: a writer's temporary file
    os.mkfifo(landing / FOLDER / "pipe.jsonl")

    outcome = ingest(landing)

    assert sorted(outcome.accepted["device_id"]) == ["d1"]
    found = rejects_by_file(outcome)
    never_read = ("notes.txt", "export.jsonl.zip", "sub/part-1.jsonl", "sub/deeper/part-2.csv", "pipe.jsonl")
    assert sorted(found) == sorted(f"{FOLDER}/{name}" for name in never_read)
    assert "file type '.txt' is not read" in found[f"{FOLDER}/notes.txt"]
    assert "in a subfolder" in found[f"{FOLDER}/sub/part-1.jsonl"]
    assert "not a regular file" in found[f"{FOLDER}/pipe.jsonl"]
    assert outcome.rows_read == 1 + len(found)


def test_a_date_folder_that_is_a_file_or_cannot_be_listed_is_a_reject_naming_it(landing, monkeypatch):
    (landing / "index_updates").mkdir(parents=True)
    (landing / "index_updates" / f"date={DAY}").write_text(jsonl("d1"), encoding="utf-8")
    write_file(landing, "2026-03-03", "good.jsonl", jsonl("d2"))
    zone = LandingZone(path=str(landing))

    assert any(f"index_updates/date={DAY}" in line for line in zone.updates_folder_problems())
    outcome = ingest(landing)
    assert list(rejects_by_file(outcome)) == [FOLDER]
    assert "not a folder" in outcome.rejects["reason"].iloc[0]

    listed = Path.iterdir

    def unreadable(path: Path):
        if path.name == "date=2026-03-03":
            raise PermissionError(13, "Permission denied", str(path))
        return listed(path)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    outcome = ingest(landing, "2026-03-03")
    assert outcome.accepted.empty
    assert outcome.rejects["reason"].tolist() == ["folder cannot be listed: Permission denied"]
    assert "2026-03-03" in LandingZone(path=str(landing)).settled_day_fingerprints(0)


def test_gzipped_json_lines_and_csv_are_read_and_a_broken_or_bombing_gzip_is_a_reject(landing, monkeypatch):
    write_file(landing, DAY, "a.jsonl.gz", gzip.compress(jsonl("d1", "d2").encode()))
    csv_text = f"device_id,key,value,observed_at\nd3,device.location.city,Berlin,{AT}\n"
    write_file(landing, DAY, "b.CSV.GZ", gzip.compress(csv_text.encode()))
    write_file(landing, DAY, "broken.jsonl.gz", gzip.compress(jsonl("d4").encode())[:-12])
    write_file(landing, DAY, "not_gzip.csv.gz", csv_text)
    write_file(landing, DAY, "bomb.jsonl.gz", gzip.compress(b" " * 5_000_000 + jsonl("d5").encode()))
    monkeypatch.setattr(landing_files, "MAX_DECOMPRESSED_BYTES", 1_000_000)

    outcome = ingest(landing)

    assert sorted(outcome.accepted["device_id"]) == ["d1", "d2", "d3"]
    assert outcome.accepted.set_index("device_id").loc["d3", "source_row"] == 1
    found = rejects_by_file(outcome)
    assert sorted(found) == [f"{FOLDER}/{n}" for n in ("bomb.jsonl.gz", "broken.jsonl.gz", "not_gzip.csv.gz")]
    assert "more than 1,000,000 bytes" in found[f"{FOLDER}/bomb.jsonl.gz"]
    assert "not a readable gzip file" in found[f"{FOLDER}/broken.jsonl.gz"]
    assert "not a readable gzip file" in found[f"{FOLDER}/not_gzip.csv.gz"]


CSV_HEADER = "device_id,key,value,observed_at"


def test_a_carriage_return_inside_a_csv_field_rejects_that_row_only(landing):
    rows = [f"d{i},device.model.name,Pixel 8,{AT}" for i in range(1, 6)]
    rows[2] = f"d3,device.model.name,Pixel\r8,{AT}"
    write_file(landing, DAY, "stray_cr.csv", "\n".join([CSV_HEADER, *rows]) + "\n")
    write_file(landing, DAY, "mac.csv", "\r".join([CSV_HEADER, f"d6,device.model.name,Pixel,{AT}"]) + "\r")
    write_file(landing, DAY, "mac.jsonl", jsonl("d7", "d8").replace("\n", "\r"))

    outcome = ingest(landing)

    assert sorted(outcome.accepted["device_id"]) == ["d1", "d2", "d4", "d5", "d6", "d7", "d8"]
    assert outcome.rejects["source_file"].tolist() == [f"{FOLDER}/stray_cr.csv"]
    assert outcome.rejects["source_row"].tolist() == [3]
    assert "carriage return" in outcome.rejects["reason"].iloc[0]
    assert outcome.accepted.set_index("device_id").loc["d4", "source_row"] == 4


@pytest.mark.parametrize(
    ("header", "found"),
    [
        ("device_id;key;value;observed_at", "found 'device_id;key;value;observed_at'"),
        ("id,key,value,observed_at", "found 'id', 'key', 'value', 'observed_at'"),
    ],
)
def test_a_csv_header_without_device_id_is_one_file_reject_saying_what_it_found(landing, header, found):
    separator = ";" if ";" in header else ","
    body = "".join(f"d{i}{separator}device.model.name{separator}Pixel{separator}{AT}\n" for i in range(50))
    write_file(landing, DAY, "odd.csv", f"{header}\n{body}")

    outcome = ingest(landing)

    assert outcome.accepted.empty
    assert len(outcome.rejects) == 1
    reason = outcome.rejects["reason"].iloc[0]
    assert reason.startswith("header has no device_id column")
    assert found in reason
    assert ("is the delimiter ';'?" in reason) == (separator == ";")
    assert "\n" not in reason


def test_csv_header_names_are_matched_whatever_their_case(landing):
    header = "Device_ID, KEY ,Value,Observed_At"
    write_file(landing, DAY, "cased.csv", f"{header}\nd1,device.model.name,Pixel,{AT}\n")

    outcome = ingest(landing)

    assert outcome.accepted["device_id"].tolist() == ["d1"]
    assert outcome.rejects.empty


@pytest.mark.parametrize(
    ("field", "cell", "reason"),
    [
        ("value", {"a": 1}, "value is a JSON object, expected text, a number or a boolean"),
        ("value", ["Berlin"], "value is a JSON array, expected text, a number or a boolean"),
        ("device_id", True, "device_id is a JSON boolean, expected text or a number"),
        ("device_id", {"id": "d9"}, "device_id is a JSON object, expected text or a number"),
        ("key", ["device.location.city"], "key is a JSON array, expected text or a number"),
        ("observed_at", False, "observed_at is a JSON boolean, expected text or a number"),
    ],
)
def test_json_objects_arrays_and_misplaced_booleans_are_rejected_with_their_type(
    landing, field, cell, reason
):
    bad = update("d9", "device.location.city", "Berlin", AT)
    bad[field] = cell
    good = update("d1", "device.settings.dark_mode", True, AT)
    write_file(landing, DAY, "typed.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n")

    outcome = ingest(landing)

    assert outcome.accepted["device_id"].tolist() == ["d1"]
    assert outcome.accepted["value"].tolist() == ["true"]
    assert outcome.rejects["reason"].tolist() == [reason]
    assert outcome.rejects["source_row"].tolist() == [2]


def test_parquet_booleans_are_values_only_as_in_json_lines(landing):
    buffer = io.BytesIO()
    pq.write_table(
        pa.table(
            {
                "device_id": [True, False],
                "key": ["device.settings.dark_mode"] * 2,
                "value": [True, False],
                "observed_at": [AT, AT],
            }
        ),
        buffer,
    )
    write_file(landing, DAY, "bools.parquet", buffer.getvalue())

    outcome = ingest(landing)

    assert outcome.accepted.empty
    reason = "device_id is a Parquet bool, expected text or a number"
    assert outcome.rejects["reason"].tolist() == [reason] * 2


@pytest.mark.parametrize(
    ("field", "text", "character"),
    [
        ("device_id", "d1\u202e", "U+202E"),  # right-to-left override
        ("device_id", "d\u200b1", "U+200B"),  # zero-width space
        ("device_id", "d\u20281", "U+2028"),  # line separator
        ("device_id", "d\x071", "U+0007"),  # a control character
        ("device_id", "d\u00a01", "U+00A0"),  # a no-break space
        ("customer_id", "c\u200d1", "U+200D"),  # zero-width joiner
        ("key", "device.location\u200b.city", "U+200B"),
    ],
)
def test_invisible_and_control_characters_in_ids_are_rejected_naming_the_character(
    landing, field, text, character
):
    bad = update("d9", "device.location.city", "Berlin", AT, customer="c9")
    bad[field] = text
    write_jsonl(landing, DAY, [update("d1", "device.location.city", "Berlin", AT), bad])

    outcome = ingest(landing)

    assert outcome.accepted["device_id"].tolist() == ["d1"]
    (reason,) = outcome.rejects["reason"]
    assert reason.startswith(f"{field} holds {character}")
    assert outcome.rejects["reason_code"].tolist() == ["invisible_character"]
    assert text not in reason  # the character itself is shown escaped


def test_ids_are_normalized_so_one_visible_id_is_one_device(landing):
    decomposed, composed = "Rene\u0301-phone", "Ren\u00e9-phone"
    write_jsonl(
        landing,
        DAY,
        [
            update(decomposed, "device.location.city", "Berlin", AT, customer="Zoe\u0308"),
            update(composed, "device.model.name", "Pixel", AT),
        ],
    )

    outcome = ingest(landing)

    assert outcome.rejects.empty
    assert outcome.accepted["device_id"].tolist() == [composed, composed]
    assert outcome.accepted["customer_id"].tolist()[0] == "Zo\u00eb"


def test_an_observed_at_long_before_the_day_is_rejected_beyond_the_late_bound(landing):
    rows = [
        update("d1", "device.location.city", "Berlin", "2026-02-26T10:00:00Z"),  # 4 days late
        update("d2", "device.location.city", "Berlin", "2026-02-01T10:00:00Z"),  # a month
        update("d3", "device.location.city", "Berlin", "1996-03-02T10:00:00Z"),  # decades
    ]
    write_jsonl(landing, DAY, rows)
    zone = LandingZone(path=str(landing))

    outcome = ingest_days([DAY], zone.read_day_files, load_feature_schema())
    lenient = ingest_days([DAY], zone.read_day_files, load_feature_schema(), max_late_days=40)

    assert outcome.accepted["device_id"].tolist() == ["d1"]
    assert outcome.late_rows == 1
    assert outcome.rejects["reason_code"].tolist() == ["too_late", "too_late"]
    assert outcome.rejects["reason"].iloc[0] == (
        "observed_at '2026-02-01T10:00:00Z' is more than 7 days before partition 2026-03-02 (max_late_days)"
    )
    assert lenient.accepted["device_id"].tolist() == ["d1", "d2"]


def test_the_updates_folder_itself_may_be_a_link_to_a_mount(landing, tmp_path):
    mounted = tmp_path / "mount" / "index_updates"
    (mounted / f"date={DAY}").mkdir(parents=True)
    (mounted / f"date={DAY}" / "part-0.jsonl").write_text(jsonl("d1"), encoding="utf-8")
    landing.mkdir(parents=True)
    (landing / "index_updates").symlink_to(mounted, target_is_directory=True)

    outcome = ingest(landing)

    assert outcome.accepted["device_id"].tolist() == ["d1"]
    assert outcome.rejects.empty


def test_a_lone_surrogate_escape_in_json_rejects_its_row_not_the_day(landing):
    good = json.dumps(update("d1", "device.location.city", "Berlin", AT))
    lone = good.replace('"d1"', '"d\\ud800"')
    paired = good.replace('"d1"', '"d\\ud83d\\ude00"')  # an escaped emoji is text
    write_file(landing, DAY, "s.jsonl", "\n".join([good, lone, paired]) + "\n")

    outcome = ingest(landing)

    assert outcome.accepted["device_id"].tolist() == ["d1", "d\U0001f600"]
    assert outcome.rejects["source_row"].tolist() == [2]
    assert outcome.rejects["reason"].iloc[0].startswith("device_id holds a lone UTF-16 surrogate")
