"""Reading and validating the landing data of several partition days. Pure: no Dagster."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pandas as pd

from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.ingest.validation import (
    ACCEPTED_COLUMNS,
    DEFAULT_MAX_LATE_DAYS,
    check_updates,
    finish_validation,
    rows_of_shard,
)
from persona_pipeline.resources.landing_files import ReadResult

UNREADABLE = "unreadable"


@dataclass
class IngestOutcome:
    accepted: pd.DataFrame
    rejects: pd.DataFrame  # partition_date, source_file, source_row, raw, reason, reason_code
    rows_read: int = 0
    duplicates_dropped: int = 0
    unknown_key_rows: int = 0
    unknown_keys: set[str] = field(default_factory=set)
    late_rows: int = 0
    problems: list[str] = field(default_factory=list)
    # Every row of the days' files, whichever device shard holds it.
    day_rows_read: int = 0

    @property
    def reject_share(self) -> float:
        return len(self.rejects) / self.rows_read if self.rows_read else 0.0


def ingest_days(
    days: list[str],
    read_day: Callable[[str], ReadResult | Iterable[ReadResult]],
    schema: FeatureSchema,
    max_late_days: float = DEFAULT_MAX_LATE_DAYS,
    shard: DeviceShard | None = None,
) -> IngestOutcome:
    """Read and validate each day. `read_day` returns the day's rows, or its files' rows one file
    at a time (then only one file's rows are held besides what was accepted). Rows observed more
    than `max_late_days` before their day are rejected. With a `shard`, only its devices' rows are
    validated and counted (rows that could not be parsed belong to the shard of the empty id)."""
    unparsed_here = shard is None or bool(shard.holds(pd.Series([""]))[0])
    accepted, rejects = [], []
    outcome = IngestOutcome(pd.DataFrame(), pd.DataFrame())
    for day in days:
        start = pd.Timestamp(day, tz="UTC")
        end = start + pd.Timedelta(days=1)
        parts = read_day(day)
        checked, unreadable = [], []
        for read in [parts] if isinstance(parts, ReadResult) else parts:
            rows = read.rows if shard is None else rows_of_shard(read.rows, shard)
            unparsed = read.rejects if unparsed_here else read.rejects.iloc[0:0]
            outcome.day_rows_read += len(read.rows) + len(read.rejects)
            checked.append(check_updates(rows, schema, day, start, end, max_late_days))
            unreadable.append(unparsed.assign(reason_code=UNREADABLE))
            outcome.rows_read += len(rows) + len(unparsed)
            outcome.problems.extend(read.problems)
        if not checked:
            empty = ReadResult.empty()
            checked.append(check_updates(empty.rows, schema, day, start, end, max_late_days))
            unreadable.append(empty.rejects.assign(reason_code=UNREADABLE))
        result = finish_validation(checked, start)
        day_rejects = pd.concat([*unreadable, result.rejects], ignore_index=True)
        rejects.append(day_rejects.assign(partition_date=day))
        accepted.append(result.accepted)
        outcome.duplicates_dropped += result.duplicates_dropped
        outcome.unknown_key_rows += result.unknown_key_rows
        outcome.unknown_keys.update(result.unknown_keys)
        outcome.late_rows += result.late_rows
    outcome.accepted = (
        pd.concat(accepted, ignore_index=True) if accepted else pd.DataFrame(columns=list(ACCEPTED_COLUMNS))
    )
    outcome.rejects = pd.concat(rejects, ignore_index=True) if rejects else pd.DataFrame()
    return outcome
