"""Feedback: responses to offers, one dynamic partition per batch, picked up by a sensor."""

import json
from dataclasses import dataclass

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.automation import SENSOR_STATUS, after_upstream_updates
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.feedback import storage
from persona_pipeline.feedback.learning import LearningSettings, learn_weights, unweighted
from persona_pipeline.feedback.validation import load_feedback
from persona_pipeline.metadata import counts_table, markdown_table, reject_share_check
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.offers.catalog import ServiceCatalog
from persona_pipeline.offers.recommend import POSITIVE_RESPONSES, app_key
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.assets import persona_vectors
from persona_pipeline.personas.weights import current_weights
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.settings import sensor_interval_seconds

offer_feedback_batches = dg.DynamicPartitionsDefinition(name="offer_feedback_batches")
FEEDBACK_REJECT_CHECK = "feedback_reject_share_within_threshold"


class OfferFeedbackConfig(dg.Config):
    max_reject_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="The reject-share check fails when more than this share of a batch's rows is rejected.",
    )
    hold_unknown_offers_days: float = Field(
        default=3.0,
        ge=0,
        description="A response to an offer that is not in the store (yet) is held this long, from the "
        "first run that read it, and tried again by every offer_feedback run (offer_feedback_sensor "
        "asks for one when new offers were made); then it is rejected as unknown_offer. 0: at once.",
    )
    max_clock_skew_minutes: float = Field(
        default=5.0,
        ge=0,
        description="A response later than now plus this is rejected as future_response.",
    )


@dg.asset(
    partitions_def=offer_feedback_batches,
    group_name="feedback",
    kinds={"pandas", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            FEEDBACK_REJECT_CHECK,
            asset="offer_feedback",
            description="Share of rejected rows in the batch stays within the threshold (default 5%).",
        )
    ],
)
def offer_feedback(
    context: dg.AssetExecutionContext,
    config: OfferFeedbackConfig,
    persona_store: PersonaStore,
    landing_zone: LandingZone,
) -> dg.MaterializeResult:
    """Responses (accepted, rejected, used, dismissed) to offers, from one complete feedback batch
    `offer_feedback/batch=<id>/` (with `_SUCCESS`). Rows for unknown offers, unknown responses or
    bad timestamps go to `offer_feedback_rejects` with a reason; re-processing replaces the batch."""
    batch_id = context.partition_key
    read = landing_zone.read_feedback_batch(batch_id)
    now = pd.Timestamp.now(tz="UTC")
    loaded = load_feedback(
        read.rows.assign(batch_id=batch_id),
        batch_id,
        storage.read_held(persona_store),
        storage.read_unknown_offer_rejects(persona_store, batch_id),
        lambda ids: storage.read_offer_times(persona_store, ids),
        now,
        hold=pd.Timedelta(days=config.hold_unknown_offers_days),
        clock_skew=pd.Timedelta(minutes=config.max_clock_skew_minutes),
    )
    unreadable = read.rejects.assign(batch_id=batch_id, reason_code="unreadable")
    rejects = pd.concat([unreadable, loaded.rejects], ignore_index=True).assign(rejected_at=now)
    storage.write_batch(
        persona_store, batch_id, loaded.responses, rejects, loaded.held, loaded.retried_batches
    )
    for problem in read.problems:
        context.log.warning(problem)
    rows = read.rows
    own = rejects["batch_id"] == batch_id
    responses = loaded.responses[loaded.responses["batch_id"] == batch_id]
    held_here = int((loaded.held["batch_id"] == batch_id).sum())
    latest = responses.sort_values("responded_at").drop_duplicates("offer_id", keep="last")
    total = len(rows) + len(read.rejects)
    share = int(own.sum()) / total if total else 0.0
    other_batches = loaded.responses[loaded.responses["batch_id"] != batch_id]
    return dg.MaterializeResult(
        metadata={
            "batch_id": dg.MetadataValue.text(batch_id),
            "rows_read": dg.MetadataValue.int(total),
            "responses": dg.MetadataValue.int(len(responses)),
            "rejected": dg.MetadataValue.int(int(own.sum())),
            "held": dg.MetadataValue.int(held_here),
            "held_in_other_batches": dg.MetadataValue.int(len(loaded.held) - held_here),
            "held_rows_now_responses": dg.MetadataValue.int(len(other_batches)),
            "held_rows_now_rejected": dg.MetadataValue.int(int((~own).sum())),
            "offers_answered": dg.MetadataValue.int(len(latest)),
            # Each offer counted by its latest answer in the batch.
            "acceptance_rate": dg.MetadataValue.float(
                round(float(latest["response"].isin(POSITIVE_RESPONSES).mean()) if len(latest) else 0.0, 4)
            ),
            "responses_by_kind": counts_table(responses["response"].value_counts(), "response", "rows"),
            "rejects_by_reason": counts_table(rejects["reason_code"].value_counts(), "reason", "rows"),
            "reject_examples": markdown_table(
                rejects[["batch_id", "source_file", "source_row", "reason"]], max_rows=5
            ),
        },
        check_results=[
            reject_share_check(
                FEEDBACK_REJECT_CHECK,
                share,
                config.max_reject_share,
                int(own.sum()),
                total,
                "offer_feedback_rejects",
            )
        ],
    )


feedback_job = dg.define_asset_job(
    "feedback_job",
    selection=dg.AssetSelection.assets(offer_feedback),
    description="Load one feedback batch (a dynamic partition) into offer_feedback.",
)


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
    # A batch loaded before (by the command line, or before a restart without a cursor) is not new.
    loaded = context.instance.get_materialized_partitions(offer_feedback.key)
    new = [
        batch
        for batch in landing_zone.complete_feedback_batches()
        if batch not in cursor.seen and batch not in loaded
    ]
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


class KeyWeightsConfig(dg.Config):
    learning_rate: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="Share of the way each weight moves towards what feedback suggests.",
    )
    floor: float = Field(default=0.02, ge=0, description="No weight falls below this.")
    ceiling: float = Field(
        default=1.0, gt=0, description="No weight rises above this (default: the largest initial weight)."
    )
    regularization: float = Field(
        default=1.0,
        gt=0,
        description="Inverse L1 strength of the logistic regression (scikit-learn's C) when there are "
        "too few answers to choose it by cross-validation.",
    )
    min_responses: int = Field(
        default=30, ge=2, description="Responses a trigger needs before it contributes to the weights."
    )
    max_fit_responses: int = Field(
        default=50_000,
        ge=100,
        description="Responses per trigger the regression is fitted on; above this, a fixed random "
        "sample with the same share accepted (the fit's cost stays flat as the fleet grows).",
    )

    def settings(self) -> LearningSettings:
        return LearningSettings(
            learning_rate=self.learning_rate,
            floor=self.floor,
            ceiling=self.ceiling,
            regularization=self.regularization,
            min_responses=self.min_responses,
            max_fit_responses=self.max_fit_responses,
        )


def _offered_dimensions(service_ids: pd.Series, schema: FeatureSchema, catalog: ServiceCatalog) -> np.ndarray:
    """Per offer, the dimension of the app a usage service is about (-1 for other services)."""
    found = {}
    for service_id in service_ids.unique():
        app = catalog.app_of(service_id)
        dimension = schema.dimension_of_key(app_key(app)) if app else None
        found[service_id] = -1 if dimension is None else dimension
    return service_ids.map(found).to_numpy(dtype=int)


@dg.asset(
    deps=[offer_feedback, service_recommendations],
    # New feedback refreshes the weights; new offers alone do not.
    automation_condition=after_upstream_updates(ignore=dg.AssetSelection.assets(service_recommendations)),
    group_name="feedback",
    kinds={"scikitlearn", "sql"},
    retry_policy=STORE_RETRY,
)
def key_weights(
    context: dg.AssetExecutionContext,
    config: KeyWeightsConfig,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """A new weights version learned from the feedback batches not learned from yet: per trigger, a
    regularised logistic regression of acceptance on the persona values at offer time; keys that
    separate accepted from rejected offers gain weight, blended with the previous weights within a
    floor and a ceiling. The next persona_vectors uses it (new collection, alias swap)."""
    schema = persona_config.feature_schema()
    current = current_weights(persona_store, schema.initial_weights())
    unlearned = storage.read_unlearned_feedback(persona_store)
    batches = unlearned.batches
    offers = storage.read_responded_offers(persona_store)
    history = storage.acceptance_by_weights_version(persona_store)
    common = {
        "acceptance_by_weights_version": markdown_table(history, max_rows=50),
        "weights_version_in_use": dg.MetadataValue.int(current.version),
    }
    if not batches:
        return dg.MaterializeResult(
            metadata={**common, "new_version": dg.MetadataValue.text("none: no new feedback")}
        )

    names = schema.dimension_names
    parts = []  # the responded offers of each stored space in the current schema's dimensions
    for space, group in offers.groupby("space", sort=True):
        dimensions = persona_storage.read_dimensions(persona_store, space)
        if dimensions["name"].tolist() != names:
            continue
        matrix = persona_storage.decode_vectors(group["persona_vector"], len(names))
        parts.append((group, unweighted(matrix, dimensions["weight"].to_numpy())))
    ordered = pd.concat([group for group, _ in parts]) if parts else offers.iloc[:0]
    values = np.vstack([matrix for _, matrix in parts]) if parts else np.zeros((0, len(names)))
    keys = [d.concrete_key or d.weight_key for d in schema.dimensions]
    # A concrete key (one app of a pattern) starts from the weight its dimension has now.
    in_effect = dict(zip(keys, schema.dimension_weights(current.weights).tolist(), strict=True))
    learned = learn_weights(
        values,
        ordered["accepted"].to_numpy(dtype=bool),
        ordered["trigger"].to_numpy(dtype=object),
        keys,
        {**current.weights, **in_effect},
        config.settings(),
        offered_dimension=_offered_dimensions(
            ordered["service_id"], schema, persona_config.service_catalog()
        ),
    )
    changed = learned.table[(learned.table["new"] - learned.table["old"]).abs() > 1e-9]
    version = current.version if changed.empty else current.version + 1
    new_weights = None if changed.empty else learned.weights
    storage.record_refresh(persona_store, version, new_weights, unlearned, len(ordered))
    context.log.info(f"weights version {version} from {len(ordered)} responded offers ({', '.join(batches)})")
    table = learned.table.assign(change=(learned.table["new"] - learned.table["old"]).round(4))
    return dg.MaterializeResult(
        metadata={
            **common,
            "new_version": dg.MetadataValue.text(
                str(version) if not changed.empty else "none: nothing changed"
            ),
            "learned_from_batches": dg.MetadataValue.text(", ".join(batches)),
            "responded_offers": dg.MetadataValue.int(len(ordered)),
            "responses_by_trigger": counts_table(
                pd.Series(learned.responses_by_trigger), "trigger", "offers"
            ),
            "weights_old_vs_new": markdown_table(
                table.sort_values("change", key=abs, ascending=False).round(4), max_rows=60
            ),
        }
    )


weights_job = dg.define_asset_job(
    "weights_job",
    selection=dg.AssetSelection.assets(key_weights),
    description="Learn a new key_weights version from feedback not learned from yet.",
)


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
    vectors = context.instance.fetch_materializations(persona_vectors.key, limit=1).records
    if vectors and vectors[0].storage_id > record.storage_id:
        return dg.SensorResult(
            skip_reason="persona_vectors was rebuilt after the newest key_weights",
            cursor=str(record.storage_id),
        )
    new_version = record.asset_materialization.metadata.get("new_version")
    if new_version is not None and str(new_version.value).startswith("none"):
        return dg.SensorResult(
            skip_reason="key_weights ran without a new version", cursor=str(record.storage_id)
        )
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"weights-{record.storage_id}")], cursor=str(record.storage_id)
    )
