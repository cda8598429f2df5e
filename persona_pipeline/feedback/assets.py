"""Feedback: responses to offers, one dynamic partition per batch, picked up by a sensor."""

from dataclasses import dataclass

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.automation import after_upstream_updates
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.feedback import reporting, storage
from persona_pipeline.feedback.gate import GateSettings, decide, guardrails, held_out, held_out_evidence
from persona_pipeline.feedback.learning import LearningSettings, learn_weights, unweighted
from persona_pipeline.feedback.reporting import FEEDBACK_REJECT_CHECK, GATE_CHECK
from persona_pipeline.feedback.validation import load_feedback
from persona_pipeline.metadata import OWNERS, table_metadata
from persona_pipeline.offers.recommend import app_key
from persona_pipeline.partitions import offer_feedback_batches
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.weights import (
    current_weights,
    initial_weights_version,
    next_version,
    read_weights_versions,
    record_configured_weights,
)
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.segments import storage as segment_storage
from persona_pipeline.service_catalog import ServiceCatalog
from persona_pipeline.store import tables as store_tables


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
    owners=OWNERS,
    metadata=table_metadata(
        store_tables.offer_feedback, store_tables.offer_feedback_rejects, store_tables.offer_feedback_held
    ),
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
    rows_read = len(read.rows) + len(read.rejects)
    return dg.MaterializeResult(
        metadata=reporting.batch_metadata(batch_id, rows_read, loaded, rejects),
        check_results=[reporting.batch_reject_check(batch_id, rows_read, rejects, config.max_reject_share)],
    )


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

    held_out_share: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="Share of devices (a stable hash of the id) whose answers are never learned from: "
        "the gate judges each candidate on them.",
    )
    gate_confidence: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="A candidate goes live only when the one-sided lower bound of its held-out "
        "improvement at this confidence is above zero.",
    )
    min_held_out: int = Field(
        default=100,
        ge=1,
        description="Held-out devices with answered offers the gate needs before any candidate goes live.",
    )
    min_segment_ari: float = Field(
        default=0.7,
        ge=-1,
        le=1,
        description="Guardrail: segments with the candidate weights against the live segments "
        "(adjusted Rand index) at least this.",
    )
    max_flag_ratio: float = Field(
        default=1.2,
        ge=1,
        le=100,
        description="Guardrail: devices flagged with the candidate at most this times the live.",
    )

    def gate_settings(self) -> GateSettings:
        return GateSettings(
            held_out_share=self.held_out_share,
            confidence=self.gate_confidence,
            min_held_out=self.min_held_out,
            min_segment_ari=self.min_segment_ari,
            max_flag_ratio=self.max_flag_ratio,
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
    owners=OWNERS,
    metadata=table_metadata(store_tables.key_weights, store_tables.key_weight_refreshes),
    deps=[offer_feedback],
    # New feedback refreshes the weights; configured_weights_sensor asks for a run when the
    # configured weights are not recorded (a new store, or someone edited them).
    automation_condition=after_upstream_updates(),
    group_name="feedback",
    kinds={"scikitlearn", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            GATE_CHECK,
            asset="key_weights",
            description="On the held-out feedback, the live weights predict acceptance no worse than "
            "the initial (configured) weights: the upper confidence bound of their improvement is not "
            "below zero.",
        )
    ],
)
def key_weights(
    context: dg.AssetExecutionContext,
    config: KeyWeightsConfig,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """A candidate weights version learned from the answered offers of the devices not held out:
    per trigger, a regularised logistic regression of acceptance on the persona values at offer
    time; keys that separate accepted from rejected offers gain weight, blended with the live
    weights within a floor and a ceiling. The candidate goes live only when the gate finds it
    better on the held-out devices' answers and the guardrails (segments, flags) hold; otherwise
    it is kept as a rejected version with the reason. The next persona_vectors uses the live one."""
    schema = persona_config.feature_schema()
    recorded = record_configured_weights(persona_store, schema.initial_weights())
    if recorded is not None:
        context.log.info(f"the configured key weights recorded as version {recorded}")
    live = current_weights(persona_store)
    unlearned = storage.read_unlearned_feedback(persona_store)
    history = storage.acceptance_by_weights_version(persona_store)
    if not unlearned.batches:
        return reporting.no_new_feedback_result(history, live.version, recorded)

    answered = _answered_in_current_space(persona_store, schema)
    keys = [d.concrete_key or d.weight_key for d in schema.dimensions]
    # A concrete key (one app of a pattern) starts from the weight its dimension has now.
    in_effect = dict(zip(keys, schema.dimension_weights(live.weights).tolist(), strict=True))
    gate_settings = config.gate_settings()
    learned_rows = ~held_out(answered.device_ids, gate_settings.held_out_share)
    offered = _offered_dimensions(answered.offers["service_id"], schema, persona_config.service_catalog())
    learned = learn_weights(
        answered.values[learned_rows],
        answered.accepted[learned_rows],
        answered.triggers[learned_rows],
        keys,
        {**live.weights, **in_effect},
        config.settings(),
        offered_dimension=offered[learned_rows],
    )
    changed = learned.table[(learned.table["new"] - learned.table["old"]).abs() > 1e-9]
    candidate = None
    if not changed.empty:
        version = next_version(read_weights_versions(persona_store))
        candidate = _judge(
            persona_store,
            schema,
            answered,
            learned_rows,
            {**live.weights, **in_effect},
            learned.weights,
            version,
            gate_settings,
        )
    in_use = storage.record_refresh(persona_store, live.version, candidate, unlearned, len(answered.offers))
    outcome = reporting.refresh_outcome(candidate)
    context.log.info(f"weights refresh from {len(answered.offers)} answered offers: {outcome}")
    weight_decisions = storage.read_weight_decisions(persona_store)
    return dg.MaterializeResult(
        metadata=reporting.refresh_metadata(
            history=history,
            live_version=live.version,
            recorded=recorded,
            in_use=in_use,
            candidate=candidate,
            learned=learned,
            weight_decisions=weight_decisions,
            batches=unlearned.batches,
            answered_offers=len(answered.offers),
            learned_rows=learned_rows,
        ),
        check_results=[
            _live_against_initial(persona_store, schema, answered, learned_rows, in_use, gate_settings)
        ],
    )


@dataclass(frozen=True)
class _Answered:
    """The answered offers made in the current feature space, with their unweighted values."""

    offers: pd.DataFrame
    values: np.ndarray
    accepted: np.ndarray
    triggers: np.ndarray
    device_ids: np.ndarray


def _answered_in_current_space(store: PersonaStore, schema: FeatureSchema) -> _Answered:
    offers = storage.read_responded_offers(store)
    names = schema.dimension_names
    parts = []  # the answered offers of each stored space in the current schema's dimensions
    for space, group in offers.groupby("space", sort=True):
        dimensions = persona_storage.read_dimensions(store, space)
        if dimensions["name"].tolist() != names:
            continue
        matrix = persona_storage.decode_vectors(group["persona_vector"], len(names))
        parts.append((group, unweighted(matrix, dimensions["weight"].to_numpy())))
    ordered = pd.concat([group for group, _ in parts]) if parts else offers.iloc[:0]
    values = np.vstack([matrix for _, matrix in parts]) if parts else np.zeros((0, len(names)))
    return _Answered(
        offers=ordered,
        values=values,
        accepted=ordered["accepted"].to_numpy(dtype=bool),
        triggers=ordered["trigger"].to_numpy(dtype=object),
        device_ids=ordered["device_id"].to_numpy(dtype=object),
    )


def _judge(
    store: PersonaStore,
    schema: FeatureSchema,
    answered: _Answered,
    learned_rows: np.ndarray,
    start: dict[str, float],
    learned: dict[str, float],
    version: int,
    settings: GateSettings,
) -> storage.Candidate:
    """The gate's decision on the learned weights: held-out evidence, then the guardrails. When
    the evidence holds but a guardrail does not, shorter steps from the live weights (`start`)
    toward the learned ones are tried (GateSettings.steps); the first that passes is the candidate."""
    live_dims = schema.dimension_weights(start)
    fleet = _guardrail_fleet(store, schema)
    decision, candidate, measured = None, learned, {}
    for step in settings.steps:
        candidate = {
            key: start.get(key, weight) + step * (weight - start.get(key, weight))
            for key, weight in learned.items()
        }
        candidate_dims = schema.dimension_weights(candidate)
        evidence = held_out_evidence(
            answered.values,
            answered.accepted,
            answered.triggers,
            learned_rows,
            live_dims,
            candidate_dims,
            settings,
            answered.device_ids,
        )
        rails = None
        if (
            fleet is not None
            and evidence.held_out_devices >= settings.min_held_out
            and evidence.lower_bound > 0
        ):
            rails = guardrails(
                fleet[0], fleet[1], live_dims, candidate_dims, schema.dimension_roles, settings
            )
        decision = decide(evidence, rails, settings)
        measured = {"step": step, **evidence.as_dict(), **(rails.as_dict() if rails else {})}
        if decision.accepted or rails is None:  # accepted, or the evidence itself failed
            break
    return storage.Candidate(
        version=version,
        weights=candidate,
        accepted=decision.accepted,
        reason=decision.reason,
        evidence=measured,
    )


def _guardrail_fleet(store: PersonaStore, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray] | None:
    """The fleet's unweighted vectors and live segments (None where the schema changed since)."""
    vectors = persona_storage.read_stored_vectors(store)
    if vectors.dimension_names != schema.dimension_names or not len(vectors.device_ids):
        return None
    stored = persona_storage.read_dimensions(store, vectors.space)["weight"].to_numpy()
    segments = segment_storage.read_assignments(store).reindex(vectors.device_ids)
    known = segments.notna().to_numpy()
    return unweighted(vectors.matrix, stored)[known], segments.to_numpy()[known].astype(np.int64)


def _live_against_initial(
    store: PersonaStore,
    schema: FeatureSchema,
    answered: _Answered,
    learned_rows: np.ndarray,
    live_version: int,
    settings: GateSettings,
) -> dg.AssetCheckResult:
    initial = initial_weights_version(store)
    if initial is None or initial.version == live_version:
        return reporting.initial_weights_live_check()
    versions = read_weights_versions(store)
    live_rows = versions[versions["version"] == live_version]
    live = live_rows.set_index("key")["weight"].to_dict()
    evidence = held_out_evidence(
        answered.values,
        answered.accepted,
        answered.triggers,
        learned_rows,
        schema.dimension_weights(initial.weights),
        schema.dimension_weights(live),
        settings,
        answered.device_ids,
    )
    return reporting.live_against_initial_check(evidence, live_version, initial.version)
