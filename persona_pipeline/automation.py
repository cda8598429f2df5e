"""Declarative automation: what keeps the assets after ingest fresh without anyone clicking.

`index_updates` and `device_profiles` run from the daily schedule and the landing-folder sensor
(ingest/jobs.py, ingest/sensors.py); `offer_feedback` from its sensor. Every asset after them carries
`AFTER_UPSTREAM` and the automation sensor below evaluates it.
"""

import dagster as dg

from persona_pipeline.run_health import reap_dead_runs
from persona_pipeline.settings import automation_on, sensor_interval_seconds

SENSOR_STATUS = dg.DefaultSensorStatus.RUNNING if automation_on() else dg.DefaultSensorStatus.STOPPED
SCHEDULE_STATUS = dg.DefaultScheduleStatus.RUNNING if automation_on() else dg.DefaultScheduleStatus.STOPPED


def after_upstream_updates(
    ignore: dg.AssetSelection | None = None, after_deps_caught_up: bool = False
) -> dg.AutomationCondition:
    """Run once after any dependency (any partition of it) updated, when none is still running.

    Unlike `AutomationCondition.eager()`, a missing partition upstream does not block it: most
    daily partitions before the first landing day are never materialized, and that is fine.
    `after_deps_caught_up`: nor while a dependency is requested in the same tick, still owes a run
    (one of its own dependencies updated since it last ran or was requested) or failed its last
    run. A dependency with other partitions runs in runs of its own, which nothing orders before
    this asset's, and Dagster counts it as requested only when it can run in the same run.
    """
    updated = dg.AutomationCondition.any_deps_updated()
    if ignore is not None:
        updated = updated.ignore(ignore)
    condition = (
        updated.since_last_handled()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    )
    if after_deps_caught_up:
        owes_a_run = dg.AutomationCondition.any_deps_updated().since(
            dg.AutomationCondition.newly_requested() | dg.AutomationCondition.newly_updated()
        )
        condition = condition & ~dg.AutomationCondition.any_deps_match(
            dg.AutomationCondition.will_be_requested()
            | owes_a_run
            | dg.AutomationCondition.execution_failed()
        )
    return condition.with_label("after upstream updates")


AFTER_UPSTREAM = after_upstream_updates()

automation_sensor = dg.AutomationConditionSensorDefinition(
    "persona_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=SENSOR_STATUS,
    minimum_interval_seconds=sensor_interval_seconds(30),
    description="Evaluates the assets' automation conditions: after new profiles, the vectors, the "
    "Qdrant index, segments, anomaly scores and offers follow; after a feedback batch, the weights.",
)


@dg.sensor(
    minimum_interval_seconds=sensor_interval_seconds(60),
    default_status=SENSOR_STATUS,
    description="Finds runs on this machine whose processes are gone (killed, out of memory, a full "
    "disk), marks them failed and frees the pool slots they held, so later runs do not wait forever.",
)
def dead_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Each tick: runs without a live process are marked failed and their pool slots freed."""
    lines = reap_dead_runs(context.instance)
    for line in lines:
        context.log.warning(line)
    return dg.SkipReason("; ".join(lines) or "no dead run holds a slot")
