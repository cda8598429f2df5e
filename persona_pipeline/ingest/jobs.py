"""The ingest job and its daily schedule over the partitions."""

import dagster as dg

from persona_pipeline.automation import SCHEDULE_STATUS
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.partitions import daily_partitions, device_day_keys

# device_profiles by its key: the personas domain sits above ingest.
ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets(index_updates.key, dg.AssetKey("device_profiles")),
    description="Read, validate and merge the landing data of the selected days into device profiles.",
)


@dg.schedule(
    job=ingest_job,
    cron_schedule=daily_partitions.get_cron_schedule(minute_of_hour=30, hour_of_day=0),
    default_status=SCHEDULE_STATUS,
    execution_timezone="UTC",
    description="Every day at 00:30 UTC: ingest the day that just ended, late files included.",
)
def ingest_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
    """At 00:30 UTC, the day that just ended, complete with its late files (a run per device
    shard). Today's files are picked up during the day by index_updates_sensor."""
    keys = daily_partitions.get_partition_keys(current_time=context.scheduled_execution_time)
    if len(keys) < 2:
        return dg.SkipReason("no complete day inside the partitions yet")
    day = keys[-2]  # the last key is today's (the partitions end one day ahead)
    return [dg.RunRequest(partition_key=key, run_key=f"schedule:{key}") for key in device_day_keys(day)]
