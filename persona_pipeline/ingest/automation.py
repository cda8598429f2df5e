"""When ingest runs: a daily schedule over the partitions, and a sensor for files as they land."""

import json
import math
import os
from pathlib import Path

import dagster as dg

from persona_pipeline.automation import SCHEDULE_STATUS, SENSOR_STATUS
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.partitions import daily_partitions, outside_partitions
from persona_pipeline.resources import LandingZone
from persona_pipeline.settings import sensor_interval_seconds

# A file younger than this may still be being written: it waits for the next tick.
SETTLE_SECONDS = 10

# device_profiles by its key: the personas domain sits above ingest.
ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets(index_updates.key, dg.AssetKey("device_profiles")),
    description="Read, validate and merge the landing data of the selected days into device profiles.",
)


def _newest_change(folder: Path) -> float:
    """When a day folder or one of its files last changed (a removed file changes the folder)."""
    try:
        with os.scandir(folder) as entries:
            times = [entry.stat().st_mtime for entry in entries if not entry.name.startswith(("_", "."))]
        return max([folder.stat().st_mtime, *times])
    except OSError:
        return math.inf


def _read_since_last_change(instance: dg.DagsterInstance, folder: Path, day: str) -> bool:
    """Whether a run that materialized the day's index_updates started after its files last changed."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=index_updates.key, asset_partitions=[day]), limit=1
    ).records
    if not records:
        return False
    run = instance.get_run_record_by_id(records[0].run_id)
    return bool(run and run.start_time and run.start_time > _newest_change(folder))


@dg.schedule(
    job=ingest_job,
    cron_schedule=daily_partitions.get_cron_schedule(minute_of_hour=30, hour_of_day=0),
    default_status=SCHEDULE_STATUS,
    execution_timezone="UTC",
    description="Every day at 00:30 UTC: ingest the day that just ended, late files included.",
)
def ingest_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """At 00:30 UTC, the day that just ended, complete with its late files. Today's files are
    picked up during the day by index_updates_sensor."""
    keys = daily_partitions.get_partition_keys(current_time=context.scheduled_execution_time)
    if len(keys) < 2:
        return dg.SkipReason("no complete day inside the partitions yet")
    day = keys[-2]  # the last key is today's (the partitions end one day ahead)
    return dg.RunRequest(partition_key=day, run_key=f"schedule:{day}")


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=sensor_interval_seconds(30),
    default_status=SENSOR_STATUS,
    description="New or changed files in a day's landing folder (today's, or a late one for a past "
    "day) get a run of that day's partition within a tick.",
)
def index_updates_sensor(context: dg.SensorEvaluationContext, landing_zone: LandingZone) -> dg.SensorResult:
    """Each tick: a day folder whose files changed since the last tick (a new file today, or a
    late one for a past day) gets a run of that day's partition, so an update reaches profiles and
    vectors within minutes. The cursor keeps a fingerprint (names, sizes, times) per day folder."""
    if landing_zone.source_db_url:
        return dg.SensorResult(skip_reason="updates come from a SQL source: the daily schedule reads them")
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    known_days = set(daily_partitions.get_partition_keys())
    current = landing_zone.settled_day_fingerprints(SETTLE_SECONDS)
    changed = sorted(day for day, print_ in current.items() if seen.get(day) != print_)
    # Days a run read after their files last changed (the command line's, or before a restart
    # without a cursor) are not read again.
    already_read = {
        day for day in changed if _read_since_last_change(context.instance, landing_zone.day_folder(day), day)
    }
    outside = [day for day in changed if day not in known_days]
    for day in outside:
        context.log.warning(f"landing folder date={day} {outside_partitions(day)}: skipped")
    requests = [
        dg.RunRequest(partition_key=day, run_key=f"{day}:{current[day]}")
        for day in changed
        if day in known_days and day not in already_read
    ]
    cursor = json.dumps({**seen, **{day: current[day] for day in changed}}, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason="no new or changed landing files", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
