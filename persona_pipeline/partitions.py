"""Partitions shared by the domains."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from persona_pipeline import settings
from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.file_store import open_location

# The two daily assets run a backfill as one run (BackfillPolicy.single_run); Dagster calls the
# parameter beta and says so for each asset in every process that loads the code, on every start.
warnings.filterwarnings(
    "ignore",
    message=r"Parameter `backfill_policy` of function `asset` is currently in beta",
    category=dg.BetaWarning,
)
# With device shards, persona_vectors depends on the profiles' shard dimension through this
# mapping, which Dagster marks beta and says so at every code load.
warnings.filterwarnings(
    "ignore",
    message=r"Class `MultiToSingleDimensionPartitionMapping` is currently in beta",
    category=dg.BetaWarning,
)

# The first partition when neither PERSONA_PARTITION_START nor a landing folder says otherwise.
FALLBACK_START = "2026-01-01"
# Partitions begin this many days before the first landed day, so a late file of the days just
# before it has a partition to land in.
LEAD_DAYS = 7
DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def first_landed_day(landing: str | Path) -> str | None:
    """The earliest well-named day folder (`index_updates/date=YYYY-MM-DD`) of a landing zone, a
    local folder or an object-store URL."""
    try:
        location = open_location(landing, "PERSONA_LANDING_DIR")
        entries = location.entries(location.path("index_updates"))
    except (pa.ArrowException, OSError, ValueError):  # unreadable: the partitions start at FALLBACK_START
        return None
    days = [
        entry.base_name.removeprefix("date=")
        for entry in entries
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("date=")
    ]
    return min((day for day in days if is_day(day)), default=None)


def is_day(text: str) -> bool:
    """YYYY-MM-DD, zero-padded (the partition keys' form), and a real day."""
    real = pd.to_datetime(text, format="%Y-%m-%d", errors="coerce") is not pd.NaT
    return bool(DAY.fullmatch(text)) and real


def partition_start(configured: str | None, landing_root: str | Path | None) -> str:
    """The first daily partition: `configured` (PERSONA_PARTITION_START) when set; else LEAD_DAYS
    before the first day in the landing folder `landing_root`; else FALLBACK_START (no landed day
    yet, or `landing_root` None: the updates come from a SQL source)."""
    configured = (configured or "").strip()
    if configured:
        if not is_day(configured):
            raise ValueError(f"PERSONA_PARTITION_START={configured!r} is not a day (YYYY-MM-DD)")
        return configured
    first = first_landed_day(landing_root) if landing_root is not None else None
    if first is None:
        return FALLBACK_START
    return (pd.Timestamp(first) - pd.Timedelta(days=LEAD_DAYS)).strftime("%Y-%m-%d")


PARTITION_START = partition_start(
    os.environ.get("PERSONA_PARTITION_START"),
    None if os.environ.get("PERSONA_SOURCE_DB_URL") else settings.landing_location(),
)

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITION_START, end_offset=1)

DEVICE_SHARDS = settings.device_shards()
DATE_DIMENSION = "date"
SHARD_DIMENSION = "shard"
device_shard_partitions = dg.StaticPartitionsDefinition([str(shard) for shard in range(DEVICE_SHARDS)])
# The per-device daily assets (ingest, profiles): by day on one shard (the embedded default, its
# keys plain days); by day and device shard above one, each (day, shard) a run of its own that an
# executor's workers can run beside the others.
device_day_partitions: dg.PartitionsDefinition = (
    daily_partitions
    if DEVICE_SHARDS == 1
    else dg.MultiPartitionsDefinition(
        {DATE_DIMENSION: daily_partitions, SHARD_DIMENSION: device_shard_partitions}
    )
)
# One run for a range of days on one shard; one run per (day, shard) with several, so a backfill
# spreads its shards over the workers.
device_day_backfill = dg.BackfillPolicy.single_run() if DEVICE_SHARDS == 1 else None


def device_day_keys(day: str) -> list[str]:
    """The partition keys of one day of the per-device daily assets: the day, or one per shard."""
    if DEVICE_SHARDS == 1:
        return [day]
    return [
        str(dg.MultiPartitionKey({DATE_DIMENSION: day, SHARD_DIMENSION: str(shard)}))
        for shard in range(DEVICE_SHARDS)
    ]


# The per-device assets after the profiles (persona_vectors): unpartitioned on one shard; above
# one, a partition per device shard, each over its shard's profiles of every day.
device_shard_only_partitions: dg.PartitionsDefinition | None = (
    device_shard_partitions if DEVICE_SHARDS > 1 else None
)


def on_device_day_partitions(asset: dg.AssetKey | str | dg.AssetsDefinition) -> dg.AssetDep:
    """A dependency of a device_shard_only_partitions asset on a device_day_partitions one: a
    shard's partition on that shard's partitions of every day."""
    if DEVICE_SHARDS == 1:
        return dg.AssetDep(asset)
    return dg.AssetDep(asset, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(SHARD_DIMENSION))


def run_shard(context: dg.AssetExecutionContext) -> DeviceShard | None:
    """The device shard of a run of a device_shard_only_partitions asset (None: every device)."""
    if DEVICE_SHARDS == 1:
        return None
    return DeviceShard(int(context.partition_key), DEVICE_SHARDS)


def device_shard_keys() -> list[str | None]:
    """The partition keys of a device_shard_only_partitions asset: None (unpartitioned) or each shard."""
    return [None] if DEVICE_SHARDS == 1 else [str(shard) for shard in range(DEVICE_SHARDS)]


def run_days_and_shard(context: dg.AssetExecutionContext) -> tuple[list[str], DeviceShard | None]:
    """The days a run of a per-device daily asset covers, and its device shard (None: every device)."""
    if DEVICE_SHARDS == 1:
        return partition_days(context.partition_time_window), None
    key = device_day_partitions.get_partition_key_from_str(context.partition_key)
    keys = key.keys_by_dimension
    return [keys[DATE_DIMENSION]], DeviceShard(int(keys[SHARD_DIMENSION]), DEVICE_SHARDS)


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
