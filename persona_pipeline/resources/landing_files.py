"""Reading landing files (JSON Lines, CSV, Parquet) into one raw frame. Pure: no Dagster.

A file never stops the others: what cannot be read becomes reject rows with the
file, the row and the reason; what can be read is returned as it was written.
Rows are numbered as a person finds them: JSON Lines by line, CSV by data row
(the header is row 0), Parquet by row. Only the contract's fields are kept, and
text lines longer than MAX_LINE_BYTES are rejected unparsed, so one odd row
cannot take the memory of the run.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# The landing zone's layout (docs/contracts.md), the same in a local folder and on an object store.
UPDATES_FOLDER = "index_updates"
FEEDBACK_FOLDER = "offer_feedback"
DATE_FOLDER = re.compile(r"^date=(.*)$")
BATCH_PREFIX = "batch="
COMPLETE_MARKER = "_SUCCESS"
# Safe as a folder name, a Dagster partition key and a run key: no path separators, no `..`.
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

FIELDS = ("device_id", "customer_id", "key", "value", "observed_at")
FEEDBACK_FIELDS = ("offer_id", "response", "responded_at")  # a feedback batch file's columns
REQUIRED_FIELDS = ("device_id", "key", "value", "observed_at")
RAW_COLUMNS = (*FIELDS, "source_file", "source_row", "raw")
# The only field that may hold a boolean (JSON true/false, a Parquet bool column).
BOOLEAN_FIELDS = ("value",)
JSON_TYPE_NAMES = {dict: "object", list: "array", bool: "boolean"}
# A JSON escape of half a UTF-16 surrogate pair: valid JSON, but alone it is not text.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# What a one-column CSV header was probably separated by, when not by commas.
OTHER_DELIMITERS = (";", "\t", "|")
REJECT_COLUMNS = ("source_file", "source_row", "raw", "reason")
SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
# JSON Lines and CSV may come gzipped (`.jsonl.gz`, `.csv.gz`); Parquet compresses itself.
GZIP_SUFFIX = ".gz"
READ_TYPES = ".jsonl, .json, .ndjson, .csv, .parquet, .jsonl.gz or .csv.gz"
# A gzipped file is decompressed up to this size and rejected beyond it: a few kilobytes of
# gzip can expand to gigabytes (a "gzip bomb").
MAX_DECOMPRESSED_BYTES = 1024**3
RAW_PREVIEW_CHARS = 2_000
# A valid update is well under 1 KiB; a line far longer is not an update.
MAX_LINE_BYTES = 64 * 1024
# UTF-32 first: its little-endian mark starts with UTF-16's.
WIDE_ENCODINGS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def check_batch_id(batch_id: str) -> str:
    """`batch_id` itself when it is a safe feedback batch id; otherwise a one-line ValueError."""
    if batch_id == "":
        raise ValueError("batch id '' is empty")
    if not BATCH_ID.fullmatch(batch_id) or ".." in batch_id:
        raise ValueError(
            f"batch id {batch_id!r} is not 1-100 characters of letters, digits, '.', '_' or '-' "
            "starting with a letter or digit (and without '..')"
        )
    return batch_id


def batch_of_folder(name: str) -> tuple[str | None, str]:
    """The batch id an `offer_feedback/` entry's name gives, or None and why it is never read."""
    label = f"{FEEDBACK_FOLDER}/{name}"
    if not name.startswith(BATCH_PREFIX):
        return None, f"{label}: not named batch=<id>: never read"
    batch_id = name.removeprefix(BATCH_PREFIX)
    try:
        check_batch_id(batch_id)
    except ValueError as exc:
        return None, f"{label}: {exc}: never read"
    return batch_id, ""


class LandingFile(Protocol):
    """A file of the landing zone: a local `Path`, or an object of an object store."""

    @property
    def name(self) -> str: ...

    def read_bytes(self) -> bytes: ...

    def open(self, mode: str = "rb") -> BinaryIO: ...


@dataclass
class ReadResult:
    rows: pd.DataFrame
    rejects: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, problems: list[str] | None = None) -> ReadResult:
        return cls(empty_rows(), empty_rejects(), problems or [])

    @classmethod
    def concat(cls, results: list[ReadResult]) -> ReadResult:
        if not results:
            return cls.empty()
        return cls(
            joined_frames([r.rows for r in results]),
            joined_frames([r.rejects for r in results]),
            [p for r in results for p in r.problems],
        )


def joined_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames' rows, one after another. Empty frames (plain object columns) are left out
    while any frame has rows: joined with the others they would turn every text and number
    column into Python objects. When none has, every frame's columns are kept."""
    found = [frame for frame in frames if len(frame)] or frames
    return pd.concat(found, ignore_index=True) if len(found) > 1 else found[0].reset_index(drop=True)


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in RAW_COLUMNS})


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})


def clip_raw(text: str) -> str:
    """Raw content as stored with a reject: at most RAW_PREVIEW_CHARS characters, and NUL
    characters spelled out (PostgreSQL text cannot hold them)."""
    clipped = text if len(text) <= RAW_PREVIEW_CHARS else text[:RAW_PREVIEW_CHARS] + f"… ({len(text)} chars)"
    return clipped.replace("\x00", "\\x00")


def _preview(line: bytes) -> str:
    """The start of a line of any length, decoded without decoding all of it."""
    text = line[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    if len(text) <= RAW_PREVIEW_CHARS and len(line) <= RAW_PREVIEW_CHARS * 4:
        return clip_raw(text)
    return clip_raw(text[:RAW_PREVIEW_CHARS]) + f"… ({len(line):,} bytes)"


def not_read(label: str, reason: str) -> ReadResult:
    """A file or folder left unread: one reject naming it and why."""
    return ReadResult(empty_rows(), file_reject(label, reason))


def file_reject(label: str, reason: str, raw: str = "", row: int | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"source_file": label, "source_row": row, "raw": raw, "reason": reason}])


def _rejects(rows: list[tuple[str, int | None, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(REJECT_COLUMNS)) if rows else empty_rejects()


def _too_long(label: str, number: int, line: bytes) -> tuple[str, int, str, str]:
    reason = f"line is {len(line):,} bytes long (limit {MAX_LINE_BYTES:,}): not read"
    return (label, number, _preview(line), reason)


def _not_utf8(label: str, number: int, line: bytes, exc: UnicodeDecodeError) -> tuple[str, int, str, str]:
    return (label, number, _preview(line), f"line is not valid UTF-8 (byte {exc.start})")


def read_landing_file(
    path: LandingFile,
    label: str,
    fields: tuple[str, ...] = FIELDS,
    required: tuple[str, ...] = REQUIRED_FIELDS,
) -> ReadResult:
    """Read one landing file into `fields` (+ source_file, source_row, raw); `label` is how the
    file is named in rejects and metadata."""
    kind, gzipped, suffix = _file_type(path.name)
    if kind is None:
        return ReadResult(empty_rows(), file_reject(label, _not_a_read_type(suffix)))
    try:
        data = _gunzip(path) if gzipped else path.read_bytes()
    except OSError as exc:
        return ReadResult(empty_rows(), file_reject(label, f"file cannot be read: {exc.strerror}"))
    except _Unreadable as exc:
        return ReadResult(empty_rows(), file_reject(label, str(exc)))
    if not data.strip():
        return ReadResult.empty([f"{label}: empty file"])
    if kind == "parquet":
        result, may_hold_nul = _read_parquet(data, label, fields, required)
        if may_hold_nul:
            result = _reject_nul_characters(result, label, fields)
    else:
        data = data.removeprefix(codecs.BOM_UTF8)
        wide = next((name for mark, name in WIDE_ENCODINGS if data.startswith(mark)), None)
        old_mac = not wide and b"\r" in data and b"\n" not in data
        if old_mac:  # lines ended by CR alone
            data = data.replace(b"\r", b"\n")
        if wide:
            result = _reject_wide_text(data, label, wide, header=kind == "csv")
        elif kind == "jsonl":
            result = _read_jsonl(data, label, fields)
        else:
            result = _read_csv(data, label, fields, required)
        if old_mac:
            result.problems.append(f"{label}: lines end in CR (\\r) alone: read as line ends")
        if b"\x00" in data or b"\\u0000" in data:
            result = _reject_nul_characters(result, label, fields)
    missing = [c for c in required if c not in result.rows.columns]
    if missing and not result.rows.empty:
        result.problems.append(f"{label}: no {', '.join(repr(c) for c in missing)} column")
    columns = (*fields, "source_file", "source_row", "raw")
    for column in columns:
        if column not in result.rows.columns:
            result.rows[column] = None
    result.rows = result.rows[list(columns)]
    return result


class _Unreadable(Exception):
    """A file that cannot be read, with the reason as its message."""


def _file_type(name: str) -> tuple[str | None, bool, str]:
    """The kind of a landing file (jsonl, csv, parquet; None when not read), whether it is
    gzipped, and its type suffix as written (".csv.gz", ".txt", "" for none)."""
    gzipped = name.lower().endswith(GZIP_SUFFIX)
    inner = Path(name[: -len(GZIP_SUFFIX)] if gzipped else name).suffix
    kind = SUFFIXES.get(inner.lower())
    if gzipped and kind == "parquet":
        kind = None
    return kind, gzipped, inner + (name[-len(GZIP_SUFFIX) :] if gzipped else "")


def _not_a_read_type(suffix: str) -> str:
    found = f"file type {suffix!r}" if suffix.strip(".") else "a file without a type suffix"
    return f"{found} is not read (expected {READ_TYPES})"


def _gunzip(path: LandingFile) -> bytes:
    """A gzipped file's content, decompressed no further than MAX_DECOMPRESSED_BYTES."""
    try:
        with path.open("rb") as raw, gzip.open(raw, "rb") as stream:
            data = stream.read(MAX_DECOMPRESSED_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _Unreadable(f"not a readable gzip file (truncated or not gzip): {exc}") from exc
    if len(data) > MAX_DECOMPRESSED_BYTES:
        raise _Unreadable(f"decompresses to more than {MAX_DECOMPRESSED_BYTES:,} bytes: not read")
    return data


def _with_source(frame: pd.DataFrame, label: str, rows: np.ndarray) -> pd.DataFrame:
    frame = frame[[c for c in frame.columns if c not in ("source_file", "source_row", "raw")]].copy()
    frame["source_file"] = label
    frame["source_row"] = rows
    frame["raw"] = None
    return frame


def _reject_wide_text(data: bytes, label: str, encoding: str, header: bool) -> ReadResult:
    """A UTF-16 or UTF-32 file: every row rejected, readable, with the reason."""
    lines = data.decode(encoding.lower(), errors="replace").lstrip("\ufeff").split("\n")
    first = 0 if header else 1  # CSV rows count from the header (row 0), JSON Lines lines from 1
    reason = f"file is {encoding} text (it starts with a {encoding} byte-order mark), expected UTF-8"
    rejects = [
        (label, number, clip_raw(line.rstrip("\r")), reason)
        for number, line in enumerate(lines, start=first)
        if line.strip() and number > 0
    ]
    return ReadResult(empty_rows(), _rejects(rejects))


def _reject_nul_characters(result: ReadResult, label: str, fields: tuple[str, ...]) -> ReadResult:
    """Rows whose text holds a NUL character: rejected (no store keeps it as text)."""
    rows = result.rows
    nul = pd.Series(False, index=rows.index)
    named = pd.Series("", index=rows.index, dtype=object)
    for column in [c for c in fields if c in rows.columns]:
        found = rows[column].map(lambda v: isinstance(v, str) and "\x00" in v).astype(bool)
        named = named.where(~found | nul, column)
        nul |= found
    if not nul.any():
        return result
    bad = rows[nul]
    rejects = pd.DataFrame(
        {
            "source_file": label,
            "source_row": bad["source_row"].to_numpy(),
            "raw": _rows_as_json(bad, fields),
            "reason": [f"{column} contains a NUL character (\\u0000)" for column in named[nul]],
        }
    )
    return ReadResult(rows[~nul], pd.concat([result.rejects, rejects], ignore_index=True), result.problems)


def _rows_as_json(rows: pd.DataFrame, fields: tuple[str, ...]) -> list[str]:
    present = [c for c in fields if c in rows.columns]
    return [
        clip_raw(json.dumps(record, default=str, ensure_ascii=False))
        for record in rows[present].astype(object).where(rows[present].notna(), None).to_dict("records")
    ]


def _read_jsonl(data: bytes, label: str, fields: tuple[str, ...]) -> ReadResult:
    lines, numbers, rejects = [], [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if len(line) > MAX_LINE_BYTES:
            rejects.append(_too_long(label, number, line))
        elif line.strip():
            lines.append(line)
            numbers.append(number)
    records = _parse_jsonl_whole(lines)
    if records is None:
        records, numbers, unparsed = _parse_jsonl_by_line(lines, numbers, label)
        rejects += unparsed
    if SURROGATE_ESCAPE.search(data):
        records, numbers, unencodable = _reject_lone_surrogates(records, numbers, label, fields)
        rejects += unencodable
    # Only the contract's fields become columns: a line with thousands of other fields
    # would otherwise widen the frame of every row.
    present = [f for f in fields if any(f in record for record in records)]
    frame = pd.DataFrame.from_records(records, columns=present, index=pd.RangeIndex(len(records)))
    rows = _with_source(frame, label, np.asarray(numbers, dtype=np.int64))
    may_nest = b"[" in data or data.count(b"{") > len(lines)
    rows, wrong_types = _reject_json_types(rows, label, fields, may_nest)
    return ReadResult(rows, pd.concat([_rejects(rejects), wrong_types], ignore_index=True))


def _reject_lone_surrogates(
    records: list[dict], numbers: list[int], label: str, fields: tuple[str, ...]
) -> tuple[list[dict], list[int], list[tuple[str, int, str, str]]]:
    """Records whose text holds a lone surrogate (`"\\ud800"` without its pair) rejected: no
    store, nor Arrow, keeps it. Looked at record by record only in a file holding such an escape."""
    kept, kept_numbers, rejects = [], [], []
    for record, number in zip(records, numbers, strict=True):
        field = next(
            (f for f in fields if isinstance(record.get(f), str) and not _encodable(record[f])), None
        )
        if field is None:
            kept.append(record)
            kept_numbers.append(number)
            continue
        reason = f"{field} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair)"
        rejects.append((label, number, clip_raw(json.dumps(record, default=str)), reason))
    return kept, kept_numbers, rejects


def _encodable(text: object) -> bool:
    if not isinstance(text, str):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_json_types(
    rows: pd.DataFrame, label: str, fields: tuple[str, ...], may_nest: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows holding a JSON object or array, or a boolean outside BOOLEAN_FIELDS, rejected with the
    type named (Parquet rejects the same cells). Types are looked at cell by cell only in a column
    that may hold them: one of text and numbers only is passed whole (`infer_dtype`)."""
    reason = pd.Series("", index=rows.index, dtype=object)
    for column in [c for c in fields if c in rows.columns]:
        series = rows[column]
        inferred = pd.api.types.infer_dtype(series, skipna=True)
        if inferred in ("string", "integer", "floating", "mixed-integer-float", "decimal", "empty"):
            continue
        if column in BOOLEAN_FIELDS and not may_nest:
            continue
        types = series.map(type)
        wrong = types.isin([dict, list] if column in BOOLEAN_FIELDS else [dict, list, bool])
        if not wrong.any():
            continue
        expected = "text, a number or a boolean" if column in BOOLEAN_FIELDS else "text or a number"
        named = f"{column} is a JSON " + types[wrong].map(JSON_TYPE_NAMES) + f", expected {expected}"
        reason[wrong & (reason == "")] = named
    bad = (reason != "").to_numpy()
    if not bad.any():
        return rows, empty_rejects()
    rejects = pd.DataFrame(
        {
            "source_file": label,
            "source_row": rows["source_row"][bad].to_numpy(),
            "raw": _rows_as_json(rows[bad], fields),
            "reason": reason[bad].to_numpy(),
        }
    )
    return rows[~bad], rejects


def _parse_jsonl_whole(lines: list[bytes]) -> list[dict] | None:
    """All lines parsed in one call when each is one JSON object; None when any is not."""
    try:
        records = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:  # not JSON, or not UTF-8
        return None
    if len(records) != len(lines) or not all(type(record) is dict for record in records):
        return None
    return records


def _parse_jsonl_by_line(
    lines: list[bytes], numbers: list[int], label: str
) -> tuple[list[dict], list[int], list[tuple[str, int, str, str]]]:
    records, kept, rejects = [], [], []
    for number, line in zip(numbers, lines, strict=True):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            rejects.append(_not_utf8(label, number, line, exc))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            reason = f"line is not valid JSON (truncated or malformed): {exc.msg} at column {exc.colno}"
            rejects.append((label, number, clip_raw(text), reason))
            continue
        if not isinstance(record, dict):
            reason = f"line is a JSON {type(record).__name__}, expected an object"
            rejects.append((label, number, clip_raw(text), reason))
            continue
        records.append(record)
        kept.append(number)
    return records, kept, rejects


def _read_csv(data: bytes, label: str, fields: tuple[str, ...], required: tuple[str, ...]) -> ReadResult:
    """CSV, one row per line: a broken line (too long, not UTF-8, an unclosed quote, too many
    fields, a carriage return in an unquoted field) is rejected alone and never shifts the rows
    after it. Header names are matched to the fields whatever their case; a header without a
    required field rejects the file in one line."""
    lines = data.split(b"\n")
    start = next(i for i, line in enumerate(lines) if line.strip())  # the header's line
    header_line = lines[start]
    if len(header_line) > MAX_LINE_BYTES or header_line.count(b'"') % 2:
        problem = "has an unclosed quote" if len(header_line) <= MAX_LINE_BYTES else "is too long"
        reason = f"header row {problem} ({len(header_line):,} bytes): file not read"
        return ReadResult(empty_rows(), file_reject(label, reason, _preview(header_line), row=0))
    header_text = header_line.decode("utf-8", errors="replace").removesuffix("\r")
    try:
        header = _field_names(next(csv.reader([header_text], skipinitialspace=True)), fields)
    except csv.Error:
        header = [header_text]
    missing = [name for name in required if name not in header]
    if missing:
        reason = _missing_columns("header", missing, header)
        return ReadResult(empty_rows(), file_reject(label, reason, clip_raw(header_text), row=0))
    whole = _parse_csv_whole(lines[start:])
    if whole is not None:
        frame, numbers = whole
        frame.columns = _field_names(list(frame.columns), fields)
        columns = [name for name in dict.fromkeys(frame.columns) if name in fields]
        return ReadResult(_with_source(frame[columns], label, numbers), empty_rejects())
    texts, rejects = [header_line.decode("utf-8", errors="replace").removesuffix("\r")], []
    for number, line in enumerate(lines[start + 1 :], start=1):
        # Rejected lines stay as blank lines, so the reader's rows keep their numbers.
        texts.append("")
        if len(line) > MAX_LINE_BYTES:
            rejects.append(_too_long(label, number, line))
            continue
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            rejects.append(_not_utf8(label, number, line, exc))
            continue
        if text.count('"') % 2:
            rejects.append((label, number, clip_raw(text), "row has an unclosed quote"))
            continue
        if "\r" in text and not _parses_as_csv(text):
            reason = "row has a carriage return (\\r) in a field that is not quoted"
            rejects.append((label, number, clip_raw(text.replace("\r", "\\r")), reason))
            continue
        texts[-1] = text
    parsed = csv.reader(texts, skipinitialspace=True)
    next(parsed)  # the header, read above
    width = len(header)
    records, numbers = [], []
    for number, values in enumerate(parsed, start=1):
        if not texts[number].strip():
            continue
        if len(values) > width:
            reason = f"row has {len(values)} fields, the header has {width}"
            rejects.append((label, number, clip_raw(texts[number]), reason))
            continue
        records.append([value or None for value in values] + [None] * (width - len(values)))
        numbers.append(number)
    columns = [name for name in dict.fromkeys(header) if name in fields]
    positions = [header.index(name) for name in columns]
    frame = pd.DataFrame(
        [[record[i] for i in positions] for record in records], columns=columns, dtype=object
    )
    return ReadResult(_with_source(frame, label, np.asarray(numbers, dtype=np.int64)), _rejects(rejects))


def _field_names(names: list[str], fields: tuple[str, ...]) -> list[str]:
    """Header names stripped, and spelled as the field they name whatever their case."""
    by_lowercase = {name.lower(): name for name in fields}
    return [by_lowercase.get(str(name).strip().lower(), str(name).strip()) for name in names]


def _missing_columns(where: str, missing: list[str], found: list[str]) -> str:
    """One line: the first missing column, the others, what was found and, for a header of one
    column, the delimiter it may have been written with."""
    others = f" (nor {', '.join(missing[1:])})" if len(missing) > 1 else ""
    shown = clip_raw(", ".join(repr(name) for name in found))
    hint = ""
    if len(found) == 1:
        delimiter = next((d for d in OTHER_DELIMITERS if d in found[0]), None)
        hint = f" (one column: is the delimiter {delimiter!r}? expected ',')" if delimiter else ""
    return f"{where} has no {missing[0]} column{others}: found {shown}{hint}: file not read"


def _parses_as_csv(text: str) -> bool:
    try:
        next(csv.reader([text]), None)
    except csv.Error:
        return False
    return True


def _parse_csv_whole(lines: list[bytes]) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The header and rows parsed in one call when no line needs to be rejected alone (too
    long, not UTF-8, an unclosed quote, too many fields); None otherwise."""
    if max(map(len, lines)) > MAX_LINE_BYTES:
        return None
    if any(line.count(b'"') % 2 for line in lines if b'"' in line):
        return None
    joined = b"\n".join(lines)
    if b"\r" in joined.replace(b"\r\n", b"\n"):  # a carriage return inside a line: one by one
        return None
    try:
        text = joined.decode("utf-8")
        frame = pd.read_csv(
            io.StringIO(text), dtype=str, keep_default_na=False, na_values=[], skipinitialspace=True
        )
    except (UnicodeDecodeError, pd.errors.ParserError):
        return None
    numbers = np.asarray([n for n, line in enumerate(lines[1:], start=1) if line.strip()], dtype=np.int64)
    if len(frame) != len(numbers):  # blank-looking lines pandas read as rows: count them one by one
        return None
    frame.columns = [str(name).strip() for name in frame.columns]
    return frame.replace({"": None}).astype(object), numbers


def _read_parquet(
    data: bytes, label: str, fields: tuple[str, ...], required: tuple[str, ...]
) -> tuple[ReadResult, bool]:
    """The rows, and whether any text in them may hold a NUL character (looked for by Arrow on
    whole columns, so the row-by-row search runs only when one does). Column names are matched
    to the fields whatever their case, as CSV headers are."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        return ReadResult(empty_rows(), file_reject(label, f"not a readable Parquet file: {exc}")), False
    names = _field_names(table.column_names, fields)
    missing = [name for name in required if name not in names]
    if missing:
        reason = _missing_columns("schema", missing, table.column_names)
        return ReadResult(empty_rows(), file_reject(label, reason, row=0)), False
    table = table.rename_columns(names)
    table = table.select([i for i, name in enumerate(names) if name in fields and names.index(name) == i])
    may_hold_nul = any(_may_hold_nul(column) for column in table.columns)
    frame = table.to_pandas(types_mapper=None)
    unusable = pd.Series("", index=frame.index, dtype=object)
    for column in frame.columns:
        kind = table.schema.field(column).type
        series = frame[column]
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            frame[column] = series.dt.strftime("%Y-%m-%dT%H:%M:%S.%f%z").astype(object)
        elif pd.api.types.is_datetime64_dtype(series.dtype):
            # Naive timestamps carry no offset; the validator rejects them with that reason.
            frame[column] = series.dt.strftime("%Y-%m-%dT%H:%M:%S").astype(object)
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            text = series.map(_utf8_or_none)
            failed = series.notna() & text.isna()
            unusable = unusable.where(~failed | (unusable != ""), f"{column} is binary data, not UTF-8 text")
            frame[column] = text.astype(object)
        elif pa.types.is_nested(kind) or (pa.types.is_boolean(kind) and column not in BOOLEAN_FIELDS):
            expected = "text, a number or a boolean" if column in BOOLEAN_FIELDS else "text or a number"
            reason = f"{column} is a Parquet {kind}, expected {expected}"
            unusable = unusable.where(~series.notna() | (unusable != ""), reason)
            frame[column] = series.astype(object)
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            # Text stays in Arrow's columns: as Python objects it took three times the memory.
            frame[column] = series.astype(object)
    rows = _with_source(frame, label, np.arange(1, len(frame) + 1))
    bad = (unusable != "").to_numpy()
    if not bad.any():
        return ReadResult(rows, empty_rejects()), may_hold_nul
    rejects = pd.DataFrame(
        {
            "source_file": label,
            "source_row": rows["source_row"][bad].to_numpy(),
            "raw": _rows_as_json(rows[bad], fields),
            "reason": unusable[bad].to_numpy(),
        }
    )
    return ReadResult(rows[~bad], rejects), may_hold_nul


def _may_hold_nul(column: pa.ChunkedArray) -> bool:
    """Whether a Parquet column may read as text holding a NUL character."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_binary(kind):
        return bool(pc.any(pc.match_substring(column, "\x00")).as_py())
    never_text = (
        pa.types.is_integer,
        pa.types.is_floating,
        pa.types.is_decimal,
        pa.types.is_boolean,
        pa.types.is_temporal,
        pa.types.is_null,
        pa.types.is_nested,
    )
    return not any(test(kind) for test in never_text)


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _utf8_or_none(value: object) -> str | None:
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None
