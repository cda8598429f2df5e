"""Segments: devices clustered by persona vector, with stable ids and readable profiles."""

import json
from dataclasses import dataclass, replace
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.automation import AFTER_UPSTREAM
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.metadata import OWNERS, table_metadata
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.assets import persona_index, persona_vectors, require_one_vector_space
from persona_pipeline.resources import PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.resources.vector_index import VECTOR_INDEX_POOL
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.segments import reporting, storage
from persona_pipeline.segments.clustering import (
    NOISE,
    ClusteringSettings,
    fit_segments,
    nearest_centre,
    refit_reason,
)
from persona_pipeline.segments.key_stats import (
    READABLE_COLUMNS,
    ReadableValues,
    SegmentStats,
    readable_values,
    segment_stats,
)
from persona_pipeline.segments.profile import describe_segments, segment_traits
from persona_pipeline.segments.reporting import STABILITY_CHECK, stability_check
from persona_pipeline.segments.sampling import stratified_sample
from persona_pipeline.segments.stable_ids import (
    UNKNOWN,
    match_segment_ids,
    previous_segments,
    stable_labels,
)
from persona_pipeline.segments.vector_payloads import sync_cluster_payloads
from persona_pipeline.store import tables as store_tables


class DeviceClustersConfig(dg.Config):
    algorithm: Literal["kmeans", "minibatch_kmeans", "dbscan", "hdbscan"] = Field(
        default="kmeans",
        description="kmeans (default; measured as fast as minibatch_kmeans at equal quality up to 300k "
        "devices), minibatch_kmeans (about 2x faster from 1M devices), or the density-based dbscan / "
        "hdbscan, which leave outliers in no segment (cluster_id -1) and suit fleets up to ~100k.",
    )
    n_clusters: int | None = Field(
        default=None,
        ge=2,
        description="K-means only: a fixed number of segments. "
        "Empty: chosen by silhouette over k_min..k_max.",
    )
    k_min: int = Field(default=4, ge=2, description="Smallest number of segments tried.")
    k_max: int = Field(default=12, ge=2, description="Largest number of segments tried.")
    k_switch_margin: float = Field(
        default=0.01,
        ge=0,
        description="Keep the previous run's number of segments unless another k's silhouette is "
        "higher by more than this (stops segments from flickering between two similar k).",
    )
    selection_sample_size: int = Field(
        default=20_000,
        ge=100,
        description="Devices sampled to choose k; the final fit uses every device.",
    )
    silhouette_sample_size: int = Field(
        default=5_000, ge=100, description="Devices sampled for each silhouette score."
    )
    fit_sample_size: int = Field(
        default=200_000,
        ge=1_000,
        description="K-means: on a larger fleet the final fit runs on a sample of this many devices "
        "and every device joins its nearest centre (memory and time follow the sample). Takes "
        "effect at the next fit.",
    )
    match_radius: float = Field(
        default=1.0,
        gt=0,
        description="A new segment keeps a previous segment's id when that segment's centre lies within "
        "this many median member distances of the new centre; otherwise it gets a new id.",
    )
    min_stable_ari: float = Field(
        default=0.7,
        ge=-1,
        le=1,
        description="The segments_stable check warns when a new fit's segments agree with the previous "
        "ones less than this (adjusted Rand index), unless the feature schema changed.",
    )
    dbscan_eps: float | None = Field(
        default=None,
        gt=0,
        description="DBSCAN neighbourhood radius. Empty: the 90th percentile of each device's distance to "
        "its dbscan_min_samples-th neighbour (sampled).",
    )
    dbscan_min_samples: int = Field(
        default=10, ge=2, description="DBSCAN: neighbours that make a core device."
    )
    hdbscan_min_cluster_size: int = Field(default=25, ge=2, description="HDBSCAN: smallest segment.")
    profile_traits: int = Field(default=3, ge=1, le=10, description="Keys shown per segment in its profile.")
    profile_sample_size: int = Field(
        default=200_000,
        ge=1_000,
        description="On a larger fleet, the segments' profiles (typical values and traits) come from "
        "a sample of this many devices stratified by segment (every segment at least 1,000 or all of "
        "it), not from every device's profile; device counts are always the whole fleet's.",
    )
    random_seed: int = Field(default=0, description="Seed of sampling and K-means initialisation.")
    refit_every_days: int = Field(
        default=7,
        ge=0,
        description="Days between full fits. In between, a run assigns only the devices whose vector "
        "changed to the nearest segment of the last fit, so a day's cost follows the change, not the "
        "fleet. 0: fit every run. Density algorithms always fit.",
    )
    refit_changed_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Fit anew, whatever the date, when more than this share of devices changed since "
        "their last assignment.",
    )
    refit: bool = Field(default=False, description="Fit anew on this run.")

    def settings(self) -> ClusteringSettings:
        return ClusteringSettings(
            algorithm=self.algorithm,
            n_clusters=self.n_clusters,
            k_min=self.k_min,
            k_max=max(self.k_max, self.k_min),
            k_switch_margin=self.k_switch_margin,
            selection_sample_size=self.selection_sample_size,
            silhouette_sample_size=self.silhouette_sample_size,
            fit_sample_size=self.fit_sample_size,
            dbscan_eps=self.dbscan_eps,
            dbscan_min_samples=self.dbscan_min_samples,
            hdbscan_min_cluster_size=self.hdbscan_min_cluster_size,
            random_seed=self.random_seed,
        )


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(
        store_tables.device_clusters,
        store_tables.segments,
        store_tables.segment_centres,
        store_tables.vector_index_clusters,
    ),
    deps=[persona_vectors, persona_index],
    automation_condition=AFTER_UPSTREAM,
    group_name="segments",
    kinds={"scikitlearn", "qdrant", "sql"},
    pool=VECTOR_INDEX_POOL,
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            STABILITY_CHECK,
            asset="device_clusters",
            description="A new fit keeps the segments: adjusted Rand index of the devices' segments "
            "against their previous ones at least min_stable_ari (not judged when the feature schema "
            "changed); warns otherwise.",
        )
    ],
)
def device_clusters(
    context: dg.AssetExecutionContext,
    config: DeviceClustersConfig,
    persona_store: PersonaStore,
    vector_index: VectorIndex,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """A segment per device from its persona vector. Segment ids are stable: a re-clustering
    matches today's segments to yesterday's (minimum-cost assignment on their centres), so an
    unchanged fleet keeps every id and a new segment gets a new one. Writes `device_clusters`,
    the `segments` registry and the `cluster_id` payload of the current Qdrant collection.

    A full fit runs every `refit_every_days` (weekly by default), when many devices changed, or
    when asked; the runs in between assign only the devices whose vector changed to the nearest
    segment of the last fit."""
    schema = persona_config.feature_schema()
    require_one_vector_space(persona_store)
    now = pd.Timestamp.now(tz="UTC")
    reason, plan = _refit_reason(config, persona_store, schema, now)
    if reason is None:
        return _assign_changed(context, persona_store, vector_index, plan, now)
    context.log.info(f"fitting segments anew: {reason}")
    vectors = persona_storage.read_stored_vectors(persona_store)
    if len(vectors.device_ids) == 0:
        return reporting.no_devices_result()
    require_current_space(vectors, schema)
    last_fit_space = storage.read_last_fit_space(persona_store)
    previous_ids = storage.read_assignments(persona_store)
    aligned_previous = previous_ids.reindex(vectors.device_ids).fillna(UNKNOWN).to_numpy(dtype=np.int64)
    previous = previous_segments(vectors.matrix, aligned_previous)

    fit = fit_segments(
        vectors.matrix,
        config.settings(),
        previous.centres if len(previous.ids) else None,
        keep_count=reason == NEW_WEIGHTS,
    )
    registry = storage.read_segment_registry(persona_store)
    matching = match_segment_ids(
        vectors.matrix,
        fit.labels,
        fit.centres,
        previous,
        next_id=storage.next_segment_id(registry, previous_ids),
        match_radius=config.match_radius,
    )
    cluster_ids = stable_labels(fit.labels, matching.ids)

    stats, values = _profile_stats(persona_store, schema, vectors, cluster_ids, config)
    described = describe_segments(stats, segment_traits(values, stats, top=config.profile_traits))
    described = described[described["segment"] != NOISE]

    assignments = pd.DataFrame(
        {
            "device_id": vectors.device_ids,
            "cluster_id": cluster_ids,
            "distance": fit.distances,
            "space": vectors.space,
            "clustered_at": now,
        }
    )
    centres = storage.centre_rows(vectors.space, matching.ids, fit.centres, now, _fit_settings(config))
    retired_because = f"{reason}; not matched to a segment of the new fit"
    storage.write_clustering(
        persona_store,
        assignments,
        storage.updated_registry(registry, described, now, retired_because),
        centres,
    )
    payloads_written = sync_cluster_payloads(persona_store, vector_index)
    context.log.info(
        f"{fit.n_segments} segments ({fit.algorithm}, {fit.note}); {matching.matched} kept their id, "
        f"{matching.new} new, retired {matching.retired or 'none'}"
    )
    schema_changed = last_fit_space is None or _schema_part(last_fit_space) != _schema_part(vectors.space)
    return dg.MaterializeResult(
        check_results=[stability_check(aligned_previous, cluster_ids, config.min_stable_ari, schema_changed)],
        metadata=reporting.fit_metadata(
            fit, matching, described, cluster_ids, aligned_previous, payloads_written, vectors.space, reason
        ),
    )


def _profile_stats(
    store: PersonaStore,
    schema: FeatureSchema,
    vectors: persona_storage.StoredVectors,
    cluster_ids: np.ndarray,
    config: DeviceClustersConfig,
) -> tuple[SegmentStats, ReadableValues]:
    """The segments' typical values, from every device's profile or, on a fleet larger than
    `profile_sample_size`, from a sample stratified by segment; sizes are the fleet's."""
    sample = stratified_sample(cluster_ids, config.profile_sample_size, config.random_seed)
    if len(sample) == len(cluster_ids):
        profiles = persona_storage.read_profiles(store, columns=READABLE_COLUMNS)
    else:
        sampled = vectors.device_ids[sample].tolist()
        profiles = persona_storage.read_profiles_of(store, sampled)[list(READABLE_COLUMNS)]
    frame = vectors.frame().iloc[sample]
    values = readable_values(profiles, schema, vectors.device_ids[sample], frame)
    stats = segment_stats(values, cluster_ids[sample])
    sizes = pd.Series(cluster_ids).value_counts().sort_index()
    return replace(stats, sizes=sizes.rename_axis(stats.sizes.index.name).rename(stats.sizes.name)), values


@dataclass
class _Assignment:
    """What a run between fits works on."""

    space: str
    fit: storage.StoredFit | None
    changed: list[str]
    gone: list[str]


def _fit_settings(config: DeviceClustersConfig) -> str:
    """The settings that shape a fit; a fit made with others is not assigned to."""
    shaping = config.model_dump(
        exclude={
            "refit",
            "refit_every_days",
            "refit_changed_share",
            "profile_traits",
            "profile_sample_size",
            "fit_sample_size",
            "min_stable_ari",
        }
    )
    return json.dumps(shaping, sort_keys=True)


# The space changed but not its dimensions or the clustering settings: new weights only.
NEW_WEIGHTS = (
    "a new weights version: the same segments are fitted in the re-weighted space, keeping their number"
)


def _schema_part(space: str) -> str:
    return space.rsplit("-w", 1)[0]


def _refit_reason(
    config: DeviceClustersConfig, store: PersonaStore, schema: FeatureSchema, now: pd.Timestamp
) -> tuple[str | None, _Assignment | None]:
    """Why this run fits anew (see `refit_reason`), or None and the devices to assign."""
    spaces = persona_storage.read_vector_spaces(store)
    if len(spaces) != 1 or persona_storage.read_dimension_names(store, spaces[0]) != schema.dimension_names:
        return "no fit of this feature space yet", None
    stored = storage.read_fit(store, spaces[0], len(schema.dimension_names))
    if stored is None and not config.refit:
        last = storage.read_last_fit_space(store)
        names = schema.dimension_names
        # A space is "<schema version>-w<weights version>": only the weights part may differ.
        same_schema = last is not None and _schema_part(last) == _schema_part(spaces[0])
        same_keys = same_schema and persona_storage.read_dimension_names(store, last) == names
        last_fit = storage.read_fit(store, last, len(names)) if same_keys else None
        if last_fit is not None and last_fit.settings == _fit_settings(config):
            return NEW_WEIGHTS, None
    changed, gone = storage.read_unassigned(store)
    if stored is not None and stored.settings != _fit_settings(config):
        return "the clustering settings changed", None
    reason = refit_reason(
        algorithm=config.algorithm,
        forced=config.refit,
        refit_every_days=config.refit_every_days,
        refit_changed_share=config.refit_changed_share,
        fitted_at=None if stored is None else stored.fitted_at.to_datetime64(),
        now=now.to_datetime64(),
        changed=len(changed),
        devices=storage.count_devices(store),
    )
    return reason, _Assignment(spaces[0], stored, changed, gone)


def _assign_changed(
    context: dg.AssetExecutionContext,
    store: PersonaStore,
    vector_index: VectorIndex,
    plan: _Assignment,
    now: pd.Timestamp,
) -> dg.MaterializeResult:
    """Between fits: the devices whose vector changed join the nearest segment of the last fit;
    devices without a vector any more leave. Nothing else is read or written."""
    space, stored, changed, gone = plan.space, plan.fit, plan.changed, plan.gone
    blobs = persona_storage.read_vector_blobs(store, changed)
    matrix = persona_storage.decode_vectors(blobs, stored.centres.shape[1]).astype(np.float64)
    nearest, distances = nearest_centre(matrix, stored.centres) if len(changed) else ([], [])
    assigned = pd.DataFrame(
        {
            "device_id": pd.Series(changed, dtype=object),
            "cluster_id": stored.cluster_ids[np.asarray(nearest, dtype=np.int64)],
            "distance": np.asarray(distances, dtype=np.float64),
            "space": space,
            "clustered_at": now,
        }
    )
    counts = storage.write_assigned(store, assigned, gone)
    payloads_written = sync_cluster_payloads(store, vector_index)
    context.log.info(
        f"assigned {len(changed):,} changed devices to the {len(stored.cluster_ids)} segments fitted at "
        f"{stored.fitted_at:%Y-%m-%d %H:%M} UTC; {len(gone):,} devices left"
    )
    return dg.MaterializeResult(
        check_results=[reporting.assigned_check()],
        metadata=reporting.assign_metadata(
            counts,
            _active_segments(store),
            len(changed),
            len(gone),
            stored.fitted_at,
            payloads_written,
            space,
        ),
    )


def require_current_space(vectors: persona_storage.StoredVectors, schema: FeatureSchema) -> None:
    """Stored vectors must be in the configured schema's space (their dimensions name the keys)."""
    if vectors.dimension_names != schema.dimension_names:
        raise dg.Failure(
            f"persona_vectors were built in feature space {vectors.space}, not in the configured "
            f"schema's ({schema.version}, {len(schema.dimension_names)} dimensions): "
            "materialize persona_vectors first",
            allow_retries=False,
        )


def _active_segments(store: PersonaStore) -> pd.DataFrame:
    registry = storage.read_segment_registry(store)
    active = registry[registry["active"] & (registry["devices"] > 0)]
    return active.rename(columns={"cluster_id": "segment"})[["segment", "name", "devices", "traits"]]
