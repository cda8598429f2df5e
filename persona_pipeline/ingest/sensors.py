"""The landing-folder sensor: files as they land get a run of their day."""

import json
import math
import os
from pathlib import Path

import dagster as dg

from persona_pipeline.automation import SENSOR_STATUS
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.ingest.jobs import ingest_job
from persona_pipeline.partitions import daily_partitions, device_day_keys, outside_partitions
from persona_pipeline.resources import LandingZone
from persona_pipeline.settings import sensor_interval_seconds

# A file younger than this may still be being written: it waits for the next tick.
SETTLE_SECONDS = 10


def _newest_change(folder: Path) -> float:
    """When a day folder or one of its files last changed (a removed file changes the folder)."""
    try:
        with os.scandir(folder) as entries:
            times = [entry.stat().st_mtime for entry in entries if not entry.name.startswith(("_", "."))]
        return max([folder.stat().st_mtime, *times])
    except OSError:
        return math.inf


def _unread_keys(instance: dg.DagsterInstance, folder: Path, day: str) -> list[str]:
    """The day's partition keys of index_updates (one per device shard) that no run materialized
    after the day's files last changed."""
    changed_at = _newest_change(folder)
    unread = []
    for key in device_day_keys(day):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=index_updates.key, asset_partitions=[key]), limit=1
        ).records
        run = instance.get_run_record_by_id(records[0].run_id) if records else None
        if not (run and run.start_time and run.start_time > changed_at):
            unread.append(key)
    return unread


# The cursor's mark of a day skipped because it is outside the daily partitions.
SKIPPED = "skipped:"


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
    # A day outside the partitions is remembered as skipped, not as read: it is warned about once
    # per change of its files, and read once the partitions reach it (after a restart with an
    # earlier PERSONA_PARTITION_START or first landed day).
    outside = [day for day in changed if day not in known_days]
    for day in outside:
        if seen.get(day) != SKIPPED + current[day]:
            context.log.warning(f"landing folder date={day} {outside_partitions(day)}: skipped")
    inside = [day for day in changed if day in known_days]
    # Days (or shards of a day) a run read after their files last changed (the command line's,
    # or before a restart without a cursor) are not read again.
    requests = [
        dg.RunRequest(partition_key=key, run_key=f"{key}:{current[day]}")
        for day in inside
        for key in _unread_keys(context.instance, landing_zone.day_folder(day), day)
    ]
    remembered = {day: current[day] for day in inside} | {day: SKIPPED + current[day] for day in outside}
    cursor = json.dumps({**seen, **remembered}, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason="no new or changed landing files", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
