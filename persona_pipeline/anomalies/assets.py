"""Anomalies: a score, a flag and a reason per device, from its segment and a PyOD detector."""

import json
from dataclasses import dataclass, replace
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.anomalies import reporting, storage
from persona_pipeline.anomalies.reasons import explain_with_causes
from persona_pipeline.anomalies.reporting import RATE_CHECK
from persona_pipeline.anomalies.scoring import (
    COMMON_SHARE,
    AnomalyNorms,
    AnomalyResult,
    AnomalySettings,
    DeviceEvidence,
    calibrated_flags,
    drift,
    fit_norms,
    score_with_norms,
)
from persona_pipeline.automation import after_upstream_updates
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.metadata import OWNERS, table_metadata
from persona_pipeline.partitions import DEVICE_SHARDS
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.assets import require_one_vector_space
from persona_pipeline.resources import PersonaConfig, PersonaStore
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.segments import storage as segment_storage
from persona_pipeline.segments.assets import device_clusters, require_current_space
from persona_pipeline.segments.assets import segments as segment_fit
from persona_pipeline.segments.key_stats import (
    READABLE_COLUMNS,
    ReadableValues,
    SegmentStats,
    dimension_groups,
    readable_values,
    segment_stats,
)
from persona_pipeline.segments.sampling import stratified_sample
from persona_pipeline.segments.stable_ids import UNKNOWN
from persona_pipeline.settings import norms_signing_key
from persona_pipeline.store import tables as store_tables


class AnomalyScoresConfig(dg.Config):
    detector: Literal["hbos", "ecod", "copod", "iforest", "knn"] = Field(
        default="hbos",
        description="PyOD detector of the second signal. hbos (default) measured best combined with the "
        "segment signal on the demo fleet and on public data (see README); knn is slow on large fleets.",
    )
    fdr: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="False-discovery rate of the flags (Benjamini-Hochberg over the fleet's calibrated "
        "p-values): the expected share of false alarms among flagged devices is at most this, and a fleet "
        "where nothing deviates beyond its normal spread gets no flag with probability >= 1 - fdr.",
    )
    reference_quantile: float = Field(
        default=0.9,
        gt=0.5,
        lt=1,
        description="The p-values' reference: the fleet's evidence up to this quantile; beyond it an "
        "exponential tail fitted between the median and this quantile. Holds while fewer than "
        "1 - reference_quantile of the devices deviate in one role.",
    )
    contamination: float | None = Field(
        default=None,
        gt=0,
        lt=0.5,
        description="Optional: flag exactly this share of the fleet (smallest p-values) instead of the "
        "false-discovery rate.",
    )
    segment_margin: float = Field(
        default=5.0,
        ge=0,
        description="Robust z of the distance from the segment that is still normal; only the excess "
        "adds to the detector's z.",
    )
    large_coverage: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Segments that together hold this share of devices are norms of their own; devices "
        "in the smaller ones are compared with the nearest large segment.",
    )
    norms_sample_size: int = Field(
        default=200_000,
        ge=1_000,
        description="A fleet larger than this is scored against norms fitted on a sample of this "
        "many devices (stratified by segment, every segment at least 1,000 or all of it), every "
        "device then scored against them page_rows at a time; a smaller fleet is its own reference.",
    )
    page_rows: int = Field(
        default=100_000,
        ge=1_000,
        description="Devices scored at a time against norms fitted on a sample: the memory of a "
        "large fleet's scoring follows this and the sample, not the fleet.",
    )
    detector_sample_size: int = Field(
        default=200_000, ge=1_000, description="Devices the detector is fitted on; it then scores all."
    )
    reason_keys: int = Field(default=3, ge=1, le=10, description="Keys named in each reason.")
    explained_top: int = Field(
        default=100,
        ge=0,
        description="Besides flagged devices, the highest-scored devices that also get a reason.",
    )
    expected_rate_min: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Lower end of the expected anomaly rate (check warns below); 0 by default, as a fleet "
        "where nothing is broken has no flag.",
    )
    expected_rate_max: float = Field(
        default=0.05, ge=0, le=1, description="Upper end of the expected anomaly rate (check warns above)."
    )
    random_seed: int = Field(default=0, description="Seed of the detector and its sample.")
    drift_level: float = Field(
        default=0.001,
        gt=0,
        lt=1,
        description="Between fits, the changed devices are scored against the stored norms only "
        "while they look like the fleet the norms were fitted on: when more of them have a p-value "
        "at most 1 % than chance allows at this level (binomial), the fleet moved (a new behaviour "
        "many devices share) and every device is scored anew.",
    )
    rescore_all: bool = Field(
        default=False,
        description="Score every device anew on this run and fit the norms again. Otherwise that "
        "happens when the segments were fitted anew (weekly by default) or these settings changed; "
        "the runs in between score only the devices whose vector or segment changed against the "
        "stored norms, and flag the fleet from every device's stored p-value.",
    )

    def settings(self) -> AnomalySettings:
        return AnomalySettings(
            detector=self.detector,
            fdr=self.fdr,
            reference_quantile=self.reference_quantile,
            segment_margin=self.segment_margin,
            contamination=self.contamination,
            large_coverage=self.large_coverage,
            detector_sample_size=self.detector_sample_size,
            random_seed=self.random_seed,
        )


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(store_tables.anomaly_scores),
    # It reads each device's segment and the time of the fit; with device shards, each device's
    # segment comes from a run per shard after the fit, and the scores wait for all of them.
    deps=[device_clusters, segment_fit],
    automation_condition=after_upstream_updates(after_deps_caught_up=DEVICE_SHARDS > 1),
    group_name="segments",
    kinds={"pyod", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            RATE_CHECK,
            asset="anomaly_scores",
            description="The share of devices flagged stays inside the configured band "
            "(expected_rate_min .. expected_rate_max); warns otherwise.",
        )
    ],
)
def anomaly_scores(
    context: dg.AssetExecutionContext,
    config: AnomalyScoresConfig,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """Per device: a calibrated `p_value`, `is_anomaly` by the Benjamini-Hochberg procedure at `fdr`,
    the flag's `kind` (the role of the keys that drove it: health, behaviour or context), `score` in
    [0, 1] (0.5 at the fleet's cut-off) and a `reason` naming the keys that deviate most, with the
    device's value against its segment's. The segment distance and a PyOD detector are kept beside
    them as `segment_z` and `detector_z` (see anomalies/scoring.py).

    Every device is scored, and the norms fitted (segment centres and spreads, the detector, each
    role's reference evidence, the segments' typical values), when the segments were fitted anew
    (weekly by default), the settings changed, when asked, or when the changed devices do not look
    like the fleet the norms were fitted on (`drift_level`); the runs in between score only the
    devices whose vector or segment changed against those norms and flag the fleet again from
    every device's stored p-value. A device's `score` is relative to the cut of the run that last
    scored it; its flag is always the current run's."""
    schema = persona_config.feature_schema()
    spaces = require_one_vector_space(persona_store)
    now = pd.Timestamp.now(tz="UTC")
    try:
        key = norms_signing_key()
    except ValueError as error:
        raise dg.Failure(str(error), allow_retries=False) from None
    reason, plan = _rescore_reason(context, config, persona_store, schema, key, spaces)
    if reason is None:
        changed = _evidence_of(persona_store, plan.norms, plan.changed)
        fleet = persona_storage.read_vector_overview(persona_store)[0]
        reason = _drift_reason(changed[1], config.drift_level, fleet)
        if reason is None:
            return _score_changed(context, config, persona_store, schema, plan, changed, now)
    context.log.info(f"scoring every device anew: {reason}")
    if persona_storage.read_vector_overview(persona_store)[0] > config.norms_sample_size:
        return _score_fleet_from_sample(context, config, persona_store, schema, key, reason, now)
    vectors = persona_storage.read_stored_vectors(persona_store)
    if len(vectors.device_ids):
        require_current_space(vectors, schema)
    # Read before the segments: a refit committed meanwhile must not pass for the one scored.
    segments_fitted_at = segment_storage.read_fitted_at(persona_store, str(vectors.space)) or now
    segments = _segments_of(segment_storage.read_assignments(persona_store), vectors.device_ids)
    if len(vectors.device_ids) == 0:
        return reporting.no_devices_result()

    settings = config.settings()
    norms, result = fit_norms(vectors.matrix, segments, settings, roles=schema.dimension_roles)
    values = readable_values(
        persona_storage.read_profiles(persona_store, columns=READABLE_COLUMNS),
        schema,
        vectors.device_ids,
        vectors.frame(),
    )
    stats = segment_stats(values, segments)
    strangest = np.lexsort((-result.combined_z, -result.score))
    explained = np.union1d(np.flatnonzero(result.is_anomaly), strangest[: config.explained_top])
    reasons = explain_with_causes(
        explained, result, dimension_groups(schema), values, stats, keys=config.reason_keys
    )
    scores = _score_rows(vectors.device_ids, result, reasons, now)
    fitted = _FittedNorms(str(vectors.space), segments_fitted_at, norms, len(scores), stats)
    return _write_fleet(context, config, persona_store, key, scores, fitted, strangest, reason, now)


@dataclass
class _FittedNorms:
    space: str
    segments_fitted_at: pd.Timestamp
    norms: AnomalyNorms
    devices: int  # fitted on
    stats: SegmentStats


def _write_fleet(
    context: dg.AssetExecutionContext,
    config: AnomalyScoresConfig,
    store: PersonaStore,
    key: bytes | None,
    scores: pd.DataFrame,
    fitted: _FittedNorms,
    strangest: np.ndarray,
    reason: str,
    now: pd.Timestamp,
) -> dg.MaterializeResult:
    """Store every device's scores with the norms they were scored against (kept only for a
    detector in KEPT_DETECTORS and with a signing key), and report."""
    stored = storage.StoredNorms(
        space=fitted.space,
        segments_fitted_at=fitted.segments_fitted_at,
        settings=_settings_key(config),
        fitted_at=now,
        devices=fitted.devices,
        norms=fitted.norms,
        stats=fitted.stats,
    )
    kept = config.detector in KEPT_DETECTORS and key is not None
    storage.write_scores(store, scores, stored if kept else None, key)
    flagged = scores["is_anomaly"].to_numpy(dtype=bool)
    rate = float(flagged.mean())
    context.log.info(f"{int(flagged.sum())} anomalies of {len(scores)} devices ({rate:.2%})")
    return dg.MaterializeResult(
        metadata={
            **reporting.scores_metadata(scores, fitted.norms.settings, strangest),
            **reporting.mode_metadata(reason, len(scores), fitted.devices, now, kept),
        },
        check_results=[reporting.rate_check(rate, config.expected_rate_min, config.expected_rate_max)],
    )


def _score_fleet_from_sample(
    context: dg.AssetExecutionContext,
    config: AnomalyScoresConfig,
    store: PersonaStore,
    schema: FeatureSchema,
    key: bytes | None,
    reason: str,
    now: pd.Timestamp,
) -> dg.MaterializeResult:
    """Every device of a fleet larger than `norms_sample_size`: the norms fitted on a sample
    stratified by segment, then every device scored against them a page at a time (memory
    follows the page and the sample, not the fleet) and the fleet flagged at once."""
    spaces = persona_storage.read_vector_spaces(store)
    if len(spaces) != 1 or persona_storage.read_dimension_names(store, spaces[0]) != schema.dimension_names:
        raise dg.Failure(
            f"persona_vectors were built in feature space(s) {spaces}, not in the configured "
            f"schema's ({schema.version}, {len(schema.dimension_names)} dimensions): "
            "materialize persona_vectors first",
            allow_retries=False,
        )
    settings = config.settings()
    segments_fitted_at = segment_storage.read_fitted_at(store, spaces[0]) or now  # before the segments
    device_ids = persona_storage.read_vector_ids(store)
    assignments = segment_storage.read_assignments(store)
    segments = _segments_of(assignments, device_ids)
    sample = stratified_sample(segments, config.norms_sample_size, config.random_seed)
    sample_ids = device_ids[sample]
    sample_matrix = _vectors_of(store, len(schema.dimension_names), sample_ids.tolist())
    norms, _ = fit_norms(sample_matrix, segments[sample], settings, roles=schema.dimension_roles)
    sample_values = _readable_values_of(store, schema, sample_ids, sample_matrix)
    stats = segment_stats(sample_values, segments[sample])
    context.log.info(f"norms fitted on {len(sample):,} of {len(device_ids):,} devices, stratified by segment")

    parts = []
    for page in persona_storage.read_vector_pages(store, config.page_rows):
        ids = page["device_id"].to_numpy(dtype=object)
        matrix = persona_storage.decode_vectors(page["vector"], len(schema.dimension_names))
        evidence = score_with_norms(norms, matrix.astype(np.float64), _segments_of(assignments, ids))
        parts.append((ids, evidence.without_deviations()))
    ids = np.concatenate([ids for ids, _ in parts])
    evidence = DeviceEvidence.joined([part for _, part in parts])
    is_anomaly, cut = calibrated_flags(evidence.log_p, settings.fdr, settings.contamination)
    result = evidence.result(is_anomaly, cut, settings)
    strangest = np.lexsort((-result.combined_z, -result.score))
    explained = np.union1d(np.flatnonzero(result.is_anomaly), strangest[: config.explained_top])
    explained_segments = _segments_of(assignments, ids[explained])
    reasons = _reasons_of(
        store, schema, config, norms, stats, ids[explained], explained_segments, result, explained, cut
    )
    scores = _score_rows(ids, result, reasons, now)
    fitted = _FittedNorms(spaces[0], segments_fitted_at, norms, len(sample), stats)
    return _write_fleet(context, config, store, key, scores, fitted, strangest, reason, now)


def _vectors_of(store: PersonaStore, dimensions: int, device_ids: list[str]) -> np.ndarray:
    blobs = persona_storage.read_vector_blobs(store, device_ids)
    return persona_storage.decode_vectors(blobs, dimensions).astype(np.float64)


def _readable_values_of(
    store: PersonaStore, schema: FeatureSchema, device_ids: np.ndarray, matrix: np.ndarray
) -> ReadableValues:
    profiles = persona_storage.read_profiles_of(store, device_ids.tolist(), READABLE_COLUMNS)
    frame = pd.DataFrame(matrix, index=device_ids, columns=schema.dimension_names)
    return readable_values(profiles, schema, device_ids, frame)


def _reasons_of(
    store: PersonaStore,
    schema: FeatureSchema,
    config: AnomalyScoresConfig,
    norms: AnomalyNorms,
    stats: SegmentStats,
    device_ids: np.ndarray,
    segments: np.ndarray,
    fleet_result: AnomalyResult,
    rows: np.ndarray,
    cut: float,
) -> pd.DataFrame:
    """Reasons of the fleet's `rows` (their `device_ids` and `segments`), whose deviations are
    scored again; their p-values, flags and cut are the fleet's."""
    matrix = _vectors_of(store, len(schema.dimension_names), device_ids.tolist())
    evidence = score_with_norms(norms, matrix, segments)
    log_p = np.log(np.maximum(fleet_result.p_value[rows], MIN_P_VALUE))
    result = replace(evidence, log_p=log_p).result(fleet_result.is_anomaly[rows], cut, norms.settings)
    values = _readable_values_of(store, schema, device_ids, matrix)
    positions = np.arange(len(rows))
    reasons = explain_with_causes(
        positions, result, dimension_groups(schema), values, stats, keys=config.reason_keys
    )
    return reasons.set_axis(rows)


@dataclass
class _Rescoring:
    """What a run between fits works on."""

    norms: storage.StoredNorms
    changed: list[str]
    gone: list[str]


def _settings_key(config: AnomalyScoresConfig) -> str:
    """The settings that shape the scores; norms fitted with others are not applied."""
    return json.dumps(config.model_dump(exclude={"rescore_all", "page_rows"}), sort_keys=True)


# Detectors whose fitted model is small enough to keep with the norms; ecod, copod and knn keep
# their training sample (every sampled device's vector), so with them every run scores every device.
KEPT_DETECTORS = ("hbos", "iforest")


def _rescore_reason(
    context: dg.AssetExecutionContext,
    config: AnomalyScoresConfig,
    store: PersonaStore,
    schema: FeatureSchema,
    key: bytes | None,
    spaces: list[str],
) -> tuple[str | None, _Rescoring | None]:
    """Why this run scores every device (fitting the norms again), or None and what to score.
    The cheap checks come first; the norms are loaded last, and only when signed with `key`."""
    if config.rescore_all:
        return "asked (rescore_all)", None
    if config.detector not in KEPT_DETECTORS:
        return f"the {config.detector} detector keeps its training data, so no norms are kept", None
    if key is None:
        return "no key signs the norms (set PERSONA_NORMS_KEY), so none are kept", None
    if len(spaces) != 1:
        return "no single feature space", None
    row = storage.read_norms_row(store)
    if row is None:
        return "no norms stored yet", None
    if row.space != spaces[0]:
        return "the feature space changed", None
    if persona_storage.read_dimension_names(store, spaces[0]) != schema.dimension_names:
        return "the feature schema changed", None
    if row.segments_fitted_at != segment_storage.read_fitted_at(store, spaces[0]):
        return "the segments were fitted anew", None
    if row.settings != _settings_key(config):
        return "the anomaly settings changed", None
    if row.versions != storage.library_versions():
        return "the norms were stored by other library versions", None
    if storage.count_without_p_value(store):
        return "scores from before p-values were stored", None
    try:
        stored = storage.load_norms(store, row, key)
    except storage.NormsUnreadable as error:
        context.log.warning(f"the stored anomaly norms are not loaded: {error}")
        return "the stored norms cannot be read", None
    if list(stored.norms.roles) != list(schema.dimension_roles):
        return "the keys' roles changed", None
    changed, gone = storage.read_unscored(store)
    return None, _Rescoring(stored, changed, gone)


def _drift_reason(evidence: DeviceEvidence, level: float, fleet: int) -> str | None:
    """Why the changed devices cannot be judged by the stored norms, if they cannot: more of them
    are strange in behaviour or context than chance allows (binomial tail below `level`), and the
    excess is common enough, over COMMON_SHARE of the fleet, that a fit including them would
    count it as normal. Health is judged against the fleet's norm (a fault is a fault however many
    devices fail), and a rarer new behaviour stays strange either way."""
    roles = [role for role in evidence.role_log_p if role != "health"]
    if not roles:
        return None
    log_p = np.vstack([evidence.role_log_p[role] for role in roles]).min(axis=0) + np.log(len(roles))
    found = drift(np.minimum(log_p, 0.0))
    if found.chance >= level or found.strange - found.expected < COMMON_SHARE * fleet:
        return None
    return (
        f"{found.strange} of the {found.devices} changed devices' behaviour or context has a p-value "
        f"at most 1 % against the norms (about {found.expected:.0f} expected; chance "
        f"{found.chance:.0e}), more than {COMMON_SHARE:.0%} of the fleet: the fleet moved"
    )


def _score_changed(
    context: dg.AssetExecutionContext,
    config: AnomalyScoresConfig,
    store: PersonaStore,
    schema: FeatureSchema,
    plan: _Rescoring,
    changed_evidence: tuple[np.ndarray, DeviceEvidence],
    now: pd.Timestamp,
) -> dg.MaterializeResult:
    """Between fits: the devices whose vector or segment changed are scored against the stored
    norms; the fleet is flagged again from every device's p-value, and devices whose flag that
    turns are scored again too (for their score and reason). Nothing else is written."""
    stored, gone = plan.norms, set(plan.gone)
    settings = stored.norms.settings
    fdr = settings.fdr if settings.contamination is None else None
    kept = storage.read_stored_flags(store, [*plan.changed, *plan.gone], fdr, config.explained_top)
    fleet = kept.rows
    changed_matrix, changed = changed_evidence
    # The devices not read whole have p-values no rank's threshold passes: as p = 1 they are flagged
    # the same (not) and count the same in the procedure's n.
    log_p = np.concatenate(
        [np.log(np.maximum(fleet["p_value"].to_numpy(), MIN_P_VALUE)), np.zeros(kept.others), changed.log_p]
    )
    flags, cut = calibrated_flags(log_p, settings.fdr, settings.contamination)
    turned = fleet.loc[flags[: len(fleet)] != fleet["is_anomaly"].to_numpy(), "device_id"].tolist()
    rescored_ids = np.array([*plan.changed, *turned], dtype=object)
    turned_matrix, turned_evidence = _evidence_of(store, stored, turned)
    # A turned device's p-value is the one its flag was decided on.
    turned_log_p = pd.Series(log_p[: len(fleet)], index=fleet["device_id"]).reindex(turned).to_numpy()
    evidence = DeviceEvidence.joined([changed, replace(turned_evidence, log_p=turned_log_p)])
    matrix = np.concatenate([changed_matrix, turned_matrix])
    turned_flags = ~fleet.set_index("device_id")["is_anomaly"].reindex(turned).to_numpy(dtype=bool)
    changed_flags = flags[len(fleet) + kept.others :]
    result = evidence.result(np.concatenate([changed_flags, turned_flags]), cut, settings)

    top_scores = np.sort(np.concatenate([kept.top_scores, result.score]))[::-1]
    ranked = len(fleet) + kept.others + len(result.score)
    top_cut = top_scores[config.explained_top - 1] if 0 < config.explained_top <= ranked else np.inf
    explained = np.flatnonzero(result.is_anomaly | (result.score >= top_cut))
    values = readable_values(
        persona_storage.read_profiles_of(store, rescored_ids.tolist(), READABLE_COLUMNS),
        schema,
        rescored_ids,
        pd.DataFrame(matrix, index=rescored_ids, columns=schema.dimension_names),
    )
    reasons = explain_with_causes(
        explained, result, dimension_groups(schema), values, stored.stats, keys=config.reason_keys
    )
    scores = _score_rows(rescored_ids, result, reasons, now)
    storage.write_rescored(store, scores, sorted(gone))

    devices = len(fleet) + kept.others + len(plan.changed)
    flagged = int(flags.sum())
    rate = flagged / devices if devices else 0.0
    context.log.info(
        f"scored {len(plan.changed):,} changed devices against the norms fitted at "
        f"{stored.fitted_at:%Y-%m-%d %H:%M} UTC; {len(turned):,} devices' flag turned, "
        f"{len(gone):,} devices left; {flagged} anomalies of {devices} devices ({rate:.2%})"
    )
    return dg.MaterializeResult(
        metadata=reporting.rescored_metadata(
            scores,
            devices,
            flagged,
            storage.flags_by_kind(store),
            len(plan.changed),
            len(turned),
            len(gone),
            stored.fitted_at,
            settings,
        ),
        check_results=[reporting.rate_check(rate, config.expected_rate_min, config.expected_rate_max)],
    )


MIN_P_VALUE = 1e-300  # a stored p-value of 0 (underflow) read as the smallest positive one


def _segments_of(assignments: pd.Series, device_ids: np.ndarray) -> np.ndarray:
    """Each device's segment; a Failure naming how many have none."""
    segments = assignments.reindex(device_ids).fillna(UNKNOWN).to_numpy(dtype=np.int64)
    if (segments == UNKNOWN).any():
        missing = int((segments == UNKNOWN).sum())
        raise dg.Failure(
            f"{missing} devices have a vector but no segment: materialize device_clusters first",
            allow_retries=False,
        )
    return segments


def _evidence_of(
    store: PersonaStore, stored: storage.StoredNorms, device_ids: list[str]
) -> tuple[np.ndarray, DeviceEvidence]:
    """The devices' vectors and their evidence against the stored norms."""
    matrix = _vectors_of(store, len(stored.norms.roles), device_ids)
    ids = np.array(device_ids, dtype=object)
    segments = _segments_of(segment_storage.read_assignments(store, device_ids), ids)
    return matrix, score_with_norms(stored.norms, matrix, segments)


def _score_rows(
    device_ids: np.ndarray, result: AnomalyResult, reasons: pd.DataFrame, now: pd.Timestamp
) -> pd.DataFrame:
    positions = np.arange(len(device_ids))
    return pd.DataFrame(
        {
            "device_id": device_ids,
            "score": result.score,
            "is_anomaly": result.is_anomaly,
            "reason": reasons["reason"].reindex(positions).to_numpy(),
            "cause": reasons["cause"].reindex(positions).to_numpy(),
            "cluster_id": result.deviation.reference,
            "segment_z": result.segment_z,
            "detector": result.settings.detector,
            "detector_z": result.detector_z,
            "scored_at": now,
            "kind": result.kind,
            "p_value": result.p_value,
        }
    )
