"""Partitions shared by the domains."""

from __future__ import annotations

import os
import warnings

import dagster as dg
import pandas as pd

# The two daily assets run a backfill as one run (BackfillPolicy.single_run); Dagster calls the
# parameter beta and says so for each asset in every process that loads the code, on every start.
warnings.filterwarnings(
    "ignore",
    message=r"Parameter `backfill_policy` of function `asset` is currently in beta",
    category=dg.BetaWarning,
)

# Recent start keeps the UI fast; set PERSONA_PARTITION_START for older landing data.
PARTITION_START = os.environ.get("PERSONA_PARTITION_START", "2026-01-01")

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITION_START, end_offset=1)
# One partition of offer_feedback per feedback batch, added by offer_feedback_sensor or the CLI.
offer_feedback_batches = dg.DynamicPartitionsDefinition(name="offer_feedback_batches")


def partition_days(window: dg.TimeWindow) -> list[str]:
    """The days (YYYY-MM-DD) of a partition time window: one for a run, many for a backfill."""
    days = pd.date_range(window.start, window.end, freq="D", inclusive="left")
    return [day.strftime("%Y-%m-%d") for day in days]


def outside_partitions(day: str) -> str | None:
    """Why a day (YYYY-MM-DD) is not one of the daily partitions, or None when it is."""
    first = daily_partitions.get_first_partition_key()
    last = daily_partitions.get_last_partition_key()
    if day > last:
        return f"is after the last partition {last}: that day has not begun yet"
    if day < first:
        return f"is before the first partition {first} (set PERSONA_PARTITION_START={day} to read it)"
    return None
