"""The feedback loop's sensors: a new batch gets a run; a new live weights version rebuilds the vectors."""

import json
from dataclasses import dataclass

import dagster as dg
import pandas as pd

from persona_pipeline.automation import SENSOR_STATUS
from persona_pipeline.feedback import storage
from persona_pipeline.feedback.assets import key_weights, offer_feedback
from persona_pipeline.feedback.jobs import feedback_job, weights_job
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.partitions import device_shard_keys, offer_feedback_batches
from persona_pipeline.personas.assets import persona_vectors
from persona_pipeline.personas.weights import configured_weights_recorded
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore
from persona_pipeline.run_health import IN_PROGRESS
from persona_pipeline.settings import sensor_interval_seconds


def unloaded_feedback_batches(
    landing_zone: LandingZone, instance: dg.DagsterInstance, seen: set[str] = frozenset()
) -> list[str]:
    """Complete feedback batches not `seen` whose partition of offer_feedback was never
    materialized: a batch loaded before (by the command line, or before a restart without a
    cursor) is not new."""
    loaded = instance.get_materialized_partitions(offer_feedback.key)
    return [
        batch
        for batch in landing_zone.complete_feedback_batches()
        if batch not in seen and batch not in loaded
    ]


@dataclass(frozen=True)
class _FeedbackCursor:
    """offer_feedback_sensor's cursor: the batches seen and the folder problems already reported.
    A cursor of before (a JSON list of the batches seen) still reads."""

    seen: set[str]
    reported: set[str]

    @classmethod
    def read(cls, text: str | None) -> "_FeedbackCursor":
        stored = json.loads(text) if text else []
        if isinstance(stored, list):
            return cls(seen=set(stored), reported=set())
        return cls(seen=set(stored["seen"]), reported=set(stored["reported"]))

    def text(self) -> str:
        return json.dumps({"seen": sorted(self.seen), "reported": sorted(self.reported)})


@dg.sensor(
    job=feedback_job,
    minimum_interval_seconds=sensor_interval_seconds(60),
    default_status=SENSOR_STATUS,
    description="A complete feedback batch (offer_feedback/batch=<id>/ with _SUCCESS) becomes a "
    "partition of offer_feedback and gets one run; each batch once, even after a restart. A folder "
    "that is not a valid batch is named in a warning and skipped.",
)
def offer_feedback_sensor(
    context: dg.SensorEvaluationContext, landing_zone: LandingZone, persona_store: PersonaStore
) -> dg.SensorResult:
    """Each tick: complete feedback batches (`_SUCCESS` present) not seen before become partitions
    of offer_feedback, with one run each. The run key is the batch id and the cursor remembers the
    batches seen, so a batch is never processed twice, even after a restart. A folder that cannot
    be a batch (an empty or unsafe id, a file, a symlink out of the landing zone) is named in a
    warning once, and the others go on. A batch with held rows (responses to offers not made yet)
    runs again after each new service_recommendations materialization, and once its hold ends."""
    cursor = _FeedbackCursor.read(context.cursor)
    problems = landing_zone.feedback_folder_problems()
    for problem in problems:
        if problem not in cursor.reported:
            context.log.warning(f"feedback folder {problem}")
    new = unloaded_feedback_batches(landing_zone, context.instance, cursor.seen)
    retries = _held_batch_retries(context.instance, storage.read_held_batches(persona_store))
    next_cursor = _FeedbackCursor(seen=cursor.seen | set(new), reported=set(problems)).text()
    if not new and not retries:
        return dg.SensorResult(skip_reason="no new complete feedback batch", cursor=next_cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=batch, run_key=batch) for batch in new] + retries,
        dynamic_partitions_requests=[offer_feedback_batches.build_add_request(new)] if new else [],
        cursor=next_cursor,
    )


def _held_batch_retries(instance: dg.DagsterInstance, held: pd.DataFrame) -> list[dg.RunRequest]:
    """One run of a batch with held rows (`held`: batch_id, hold_until, the earliest of its rows)
    when no offer_feedback run (of any batch: each retries every held row) came after the newest
    offers, or after a hold ended. Run keys name the offers' materialization or the end of the
    hold, so each is asked for once."""
    if held.empty:
        return []
    newest_offers = instance.fetch_materializations(service_recommendations.key, limit=1).records
    last_feedback = instance.fetch_materializations(offer_feedback.key, limit=1).records
    last_id = last_feedback[0].storage_id if last_feedback else 0
    last_at = pd.Timestamp(last_feedback[0].timestamp, unit="s", tz="UTC") if last_feedback else None
    held = held.sort_values(["hold_until", "batch_id"])
    if newest_offers and newest_offers[0].storage_id > last_id:
        batch = held["batch_id"].iloc[0]
        return [dg.RunRequest(partition_key=batch, run_key=f"{batch}:offers-{newest_offers[0].storage_id}")]
    ended = held[(held["hold_until"] <= pd.Timestamp.now(tz="UTC"))]
    if last_at is not None:
        ended = ended[ended["hold_until"] > last_at]
    if ended.empty:
        return []
    batch, hold_until = ended["batch_id"].iloc[0], ended["hold_until"].iloc[0]
    return [dg.RunRequest(partition_key=batch, run_key=f"{batch}:hold-ended-{hold_until:%Y%m%dT%H%M%S}")]


@dg.sensor(
    asset_selection=dg.AssetSelection.assets(persona_vectors),
    minimum_interval_seconds=sensor_interval_seconds(30),
    default_status=SENSOR_STATUS,
    description="A new key_weights version rebuilds the persona vectors with it; automation then "
    "carries them to the index, segments, scores and offers.",
)
def key_weights_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """A new weights version rebuilds the persona vectors with it (automation then carries the
    new vectors to the index, segments, scores and offers). The loop closes through the weights
    store, not a graph edge, so this sensor stands in for the edge. The cursor is the storage id
    of the last key_weights materialization seen."""
    latest = context.instance.fetch_materializations(key_weights.key, limit=1).records
    if not latest:
        return dg.SensorResult(skip_reason="key_weights was never materialized")
    record = latest[0]
    seen = int(context.cursor) if context.cursor else 0
    if record.storage_id <= seen:
        return dg.SensorResult(skip_reason="no new key_weights materialization")
    behind = [
        key for key in device_shard_keys() if _vectors_older_than(context.instance, key, record.storage_id)
    ]
    if not behind:
        return dg.SensorResult(
            skip_reason="persona_vectors was rebuilt after the newest key_weights",
            cursor=str(record.storage_id),
        )
    metadata = record.asset_materialization.metadata
    changed = metadata.get("live_version_changed")
    if changed is None and "new_version" in metadata:  # written before the weights gate (0007)
        new_version = str(metadata["new_version"].value)
        changed = dg.MetadataValue.bool(not new_version.startswith("none"))
    if changed is None or changed.value is not True:
        return dg.SensorResult(
            skip_reason="key_weights ran without a new live version", cursor=str(record.storage_id)
        )
    requests = [
        dg.RunRequest(partition_key=key, run_key=f"weights-{record.storage_id}" + (f"-{key}" if key else ""))
        for key in behind
    ]
    return dg.SensorResult(run_requests=requests, cursor=str(record.storage_id))


def _vectors_older_than(instance: dg.DagsterInstance, partition: str | None, storage_id: int) -> bool:
    """Whether persona_vectors (of one shard's partition, when sharded) was last materialized
    before the event `storage_id`, or never."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=persona_vectors.key, asset_partitions=None if partition is None else [partition]
        ),
        limit=1,
    ).records
    return not records or records[0].storage_id < storage_id


# A weights_job run that failed this recently is not asked for again yet (a store that is down
# would otherwise get a failed run every tick).
RETRY_AFTER = pd.Timedelta(minutes=10)
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, *IN_PROGRESS]


@dg.sensor(
    job=weights_job,
    minimum_interval_seconds=sensor_interval_seconds(60),
    default_status=SENSOR_STATUS,
    description="When the configured key weights are not recorded (a new store, or someone edited "
    "them in the feature schema), runs key_weights to record them; key_weights_sensor then rebuilds "
    "the vectors with them. Until then persona_vectors uses the live version.",
)
def configured_weights_sensor(
    context: dg.SensorEvaluationContext, persona_store: PersonaStore, persona_config: PersonaConfig
) -> dg.SensorResult | dg.SkipReason:
    """Each tick: a weights_job run when the configured weights are not the newest configured
    version recorded, unless such a run is under way or failed less than RETRY_AFTER ago."""
    configured = persona_config.feature_schema().initial_weights()
    if configured_weights_recorded(persona_store, configured):
        return dg.SkipReason("the configured key weights are recorded")
    runs = dg.RunsFilter(job_name=weights_job.name, statuses=IN_FLIGHT)
    if context.instance.get_runs(filters=runs, limit=1):
        return dg.SkipReason("a weights_job run is under way")
    since = (pd.Timestamp.now(tz="UTC") - RETRY_AFTER).to_pydatetime()
    failed = dg.RunsFilter(
        job_name=weights_job.name, statuses=[dg.DagsterRunStatus.FAILURE], updated_after=since
    )
    if context.instance.get_runs(filters=failed, limit=1):
        return dg.SkipReason(f"weights_job failed less than {RETRY_AFTER} ago: asked for again after that")
    request = dg.RunRequest(tags={"persona/reason": "configured weights not recorded"})
    return dg.SensorResult(run_requests=[request])
