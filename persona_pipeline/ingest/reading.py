"""Reading landing files (JSON Lines, CSV, Parquet) into one raw frame. Pure: no Dagster.

A file never stops the others: what cannot be read becomes reject rows with the
file, the line and the reason; what can be read is returned as it was written.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FIELDS = ("device_id", "customer_id", "key", "value", "observed_at")
REQUIRED_FIELDS = ("device_id", "key", "value", "observed_at")
RAW_COLUMNS = (*FIELDS, "source_file", "source_row", "raw")
REJECT_COLUMNS = ("source_file", "source_row", "raw", "reason")
SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
RAW_PREVIEW_CHARS = 2_000


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
            pd.concat([r.rows for r in results], ignore_index=True),
            pd.concat([r.rejects for r in results], ignore_index=True),
            [p for r in results for p in r.problems],
        )


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in RAW_COLUMNS})


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})


def clip_raw(text: str) -> str:
    return text if len(text) <= RAW_PREVIEW_CHARS else text[:RAW_PREVIEW_CHARS] + f"… ({len(text)} chars)"


def file_reject(label: str, reason: str, raw: str = "", row: int | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"source_file": label, "source_row": row, "raw": raw, "reason": reason}])


def read_landing_file(
    path: Path,
    label: str,
    fields: tuple[str, ...] = FIELDS,
    required: tuple[str, ...] = REQUIRED_FIELDS,
) -> ReadResult:
    """Read one landing file into `fields` (+ source_file, source_row, raw); `label` is how the
    file is named in rejects and metadata."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        return ReadResult.empty([f"{label}: skipped, not .jsonl, .csv or .parquet"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ReadResult(empty_rows(), file_reject(label, f"file cannot be read: {exc.strerror}"))
    if not data.strip():
        return ReadResult.empty([f"{label}: empty file"])
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind]
    result = reader(data, label)
    missing = [c for c in required if c not in result.rows.columns]
    if missing and not result.rows.empty:
        result.problems.append(f"{label}: no {', '.join(repr(c) for c in missing)} column")
    columns = (*fields, "source_file", "source_row", "raw")
    for column in columns:
        if column not in result.rows.columns:
            result.rows[column] = None
    result.rows = result.rows[list(columns)]
    return result


def _with_source(frame: pd.DataFrame, label: str, rows: np.ndarray) -> pd.DataFrame:
    frame = frame[[c for c in frame.columns if c not in ("source_file", "source_row", "raw")]].copy()
    frame["source_file"] = label
    frame["source_row"] = rows
    frame["raw"] = None
    return frame


def _read_jsonl(data: bytes, label: str) -> ReadResult:
    # Fast path: the whole file parses. pandas skips blank lines, so line numbers
    # only line up when there are none; otherwise the per-line path numbers them.
    if b"\n\n" not in data and not data.startswith((b"\n", b"\r\n")):
        try:
            frame = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
        except (ValueError, UnicodeDecodeError):
            frame = None
        if frame is not None and len(frame) == data.rstrip(b"\r\n").count(b"\n") + 1:
            return ReadResult(_with_source(frame, label, np.arange(1, len(frame) + 1)), empty_rejects())
    return _read_jsonl_by_line(data, label)


def _read_jsonl_by_line(data: bytes, label: str) -> ReadResult:
    """Per-line parsing, used only for files the fast path cannot read whole."""
    records, numbers, rejects = [], [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = clip_raw(line.decode("utf-8", errors="replace"))
            rejects.append((label, number, raw, f"line is not valid UTF-8 (byte {exc.start})"))
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
        numbers.append(number)
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(FIELDS))
    return ReadResult(
        _with_source(frame, label, np.asarray(numbers, dtype=np.int64)),
        pd.DataFrame(rejects, columns=list(REJECT_COLUMNS)) if rejects else empty_rejects(),
    )


def _read_csv(data: bytes, label: str) -> ReadResult:
    try:
        text = data.decode("utf-8")
        bad_lines = empty_rejects()
    except UnicodeDecodeError:
        text, bad_lines = _drop_undecodable_lines(data, label)
    options = {"dtype": str, "keep_default_na": False, "na_values": [], "skipinitialspace": True}
    try:
        frame = pd.read_csv(io.StringIO(text), **options)
        rows = np.arange(1, len(frame) + 1)
        malformed = empty_rejects()
    except pd.errors.ParserError:
        found: list[list[str]] = []
        frame = pd.read_csv(
            io.StringIO(text),
            engine="python",
            on_bad_lines=lambda fields: found.append(fields),
            **options,
        )
        rows = np.arange(1, len(frame) + 1)
        columns = len(frame.columns)
        malformed = pd.DataFrame(
            [
                (
                    label,
                    None,
                    clip_raw(",".join(f)),
                    f"row has {len(f)} fields, the header has {columns}",
                )
                for f in found
            ],
            columns=list(REJECT_COLUMNS),
        )
    except pd.errors.EmptyDataError:
        return ReadResult(empty_rows(), bad_lines, [f"{label}: no header row"])
    frame = frame.replace({"": None})
    return ReadResult(_with_source(frame, label, rows), pd.concat([bad_lines, malformed], ignore_index=True))


def _drop_undecodable_lines(data: bytes, label: str) -> tuple[str, pd.DataFrame]:
    kept, rejects = [], []
    for number, line in enumerate(data.split(b"\n")):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raw = clip_raw(line.decode("utf-8", errors="replace"))
            rejects.append((label, number, raw, f"line is not valid UTF-8 (byte {exc.start})"))
    return "\n".join(kept), pd.DataFrame(rejects, columns=list(REJECT_COLUMNS))


def _read_parquet(data: bytes, label: str) -> ReadResult:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        return ReadResult(empty_rows(), file_reject(label, f"not a readable Parquet file: {exc}"))
    frame = table.to_pandas(types_mapper=None)
    for column in frame.columns:
        series = frame[column]
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            frame[column] = series.dt.strftime("%Y-%m-%dT%H:%M:%S.%f%z").astype(object)
        elif pd.api.types.is_datetime64_dtype(series.dtype):
            # Naive timestamps carry no offset; the validator rejects them with that reason.
            frame[column] = series.dt.strftime("%Y-%m-%dT%H:%M:%S").astype(object)
        else:
            frame[column] = series.astype(object)
    return ReadResult(_with_source(frame, label, np.arange(1, len(frame) + 1)), empty_rejects())
