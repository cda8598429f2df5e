"""Reading and validating the landing data of several partition days. Pure: no Dagster."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.ingest.reading import ReadResult
from persona_pipeline.ingest.validation import ACCEPTED_COLUMNS, validate_updates

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

    @property
    def reject_share(self) -> float:
        return len(self.rejects) / self.rows_read if self.rows_read else 0.0


def ingest_days(
    days: list[str], read_day: Callable[[str], ReadResult], schema: FeatureSchema
) -> IngestOutcome:
    accepted, rejects = [], []
    outcome = IngestOutcome(pd.DataFrame(), pd.DataFrame())
    for day in days:
        read = read_day(day)
        start = pd.Timestamp(day, tz="UTC")
        result = validate_updates(read.rows, schema, day, start, start + pd.Timedelta(days=1))
        unreadable = read.rejects.assign(reason_code=UNREADABLE)
        day_rejects = pd.concat([unreadable, result.rejects], ignore_index=True)
        rejects.append(day_rejects.assign(partition_date=day))
        accepted.append(result.accepted)
        outcome.rows_read += len(read.rows) + len(read.rejects)
        outcome.duplicates_dropped += result.duplicates_dropped
        outcome.unknown_key_rows += result.unknown_key_rows
        outcome.unknown_keys.update(result.unknown_keys)
        outcome.late_rows += result.late_rows
        outcome.problems.extend(read.problems)
    outcome.accepted = (
        pd.concat(accepted, ignore_index=True) if accepted else pd.DataFrame(columns=list(ACCEPTED_COLUMNS))
    )
    outcome.rejects = pd.concat(rejects, ignore_index=True) if rejects else pd.DataFrame()
    return outcome
