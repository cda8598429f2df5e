"""Segments: fitted on the persona vectors (`segments`, fleet-wide on a bounded sample), with
stable ids and readable profiles; and each device's segment (`device_clusters`, shard by shard)."""

import json
from dataclasses import replace
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.automation import AFTER_UPSTREAM
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.metadata import OWNERS, table_metadata
from persona_pipeline.partitions import device_shard_only_partitions, run_shard
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
from persona_pipeline.segments.reporting import ASSIGNED_CHECK, STABILITY_CHECK, stability_check
from persona_pipeline.segments.sampling import stratified_sample
from persona_pipeline.segments.stable_ids import (
    UNKNOWN,
    match_segment_ids,
    previous_segments,
    stable_labels,
)
from persona_pipeline.segments.vector_payloads import sync_cluster_payloads
from persona_pipeline.store import tables as store_tables


class SegmentsConfig(dg.Config):
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
        description="Devices sampled to choose k; the final fit uses every device of the fit.",
    )
    silhouette_sample_size: int = Field(
        default=5_000, ge=100, description="Devices sampled for each silhouette score."
    )
    fit_sample_size: int = Field(
        default=200_000,
        ge=1_000,
        description="K-means: on a larger fleet the fit reads and segments a uniform sample of this "
        "many devices (the lowest hashes of device_id) and device_clusters gives every other device "
        "its nearest centre, shard by shard (memory and time follow the sample). Density algorithms "
        "read every device. Takes effect at the next fit.",
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
        description="Days between full fits. In between, the last fit stands and device_clusters "
        "assigns only the devices whose vector changed to its nearest segment, so a day's cost "
        "follows the change, not the fleet. 0: fit every run. Density algorithms always fit.",
    )
    refit_changed_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Fit anew, whatever the date, when more than this share of devices changed since "
        "the last fit and their last assignment.",
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
        store_tables.segment_fits,
        store_tables.segments,
        store_tables.segment_centres,
        store_tables.segment_members,
    ),
    deps=[persona_vectors],
    automation_condition=AFTER_UPSTREAM,
    group_name="segments",
    kinds={"scikitlearn", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            STABILITY_CHECK,
            asset="segments",
            description="A new fit keeps the segments: adjusted Rand index of the fitted devices' segments "
            "against their previous ones at least min_stable_ari (not judged when the feature schema "
            "changed); warns otherwise.",
        )
    ],
)
def segments(
    context: dg.AssetExecutionContext,
    config: SegmentsConfig,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """The segments: centres fitted on the persona vectors, with stable ids and readable profiles.
    Segment ids are stable: a new fit matches today's segments to yesterday's (minimum-cost
    assignment on their centres), so an unchanged fleet keeps every id and a new segment gets a
    new one. Writes the `segments` registry, the fit's `segment_centres` and its `segment_members`
    (the devices it segmented); device_clusters then gives every device its segment, shard by shard.

    A full fit runs every `refit_every_days` (weekly by default), when many devices changed, or
    when asked; in between the last fit stands. K-means fits a bounded sample of the fleet
    (`fit_sample_size`), so neither its time nor its memory grows with the fleet beyond it."""
    schema = persona_config.feature_schema()
    require_one_vector_space(persona_store)
    now = pd.Timestamp.now(tz="UTC")
    reason, stored = _refit_reason(config, persona_store, schema, now)
    if reason is None:
        return reporting.kept_fit_result(stored.fitted_at, len(stored.cluster_ids))
    context.log.info(f"fitting segments anew: {reason}")
    density = config.algorithm in ("dbscan", "hdbscan")
    fleet = persona_storage.read_vector_overview(persona_store)[0]
    sampled = not density and fleet > config.fit_sample_size
    vectors = persona_storage.read_stored_vectors(persona_store, config.fit_sample_size if sampled else None)
    if len(vectors.device_ids) == 0:
        return reporting.no_devices_result()
    require_current_space(vectors, schema)
    last_fit_space = storage.read_last_fit_space(persona_store)
    fitted_ids = vectors.device_ids.tolist() if sampled else None
    # A device the last fit segmented and device_clusters has not assigned yet keeps that segment
    # as its previous one, so a fit run again before the assignment keeps the segments' ids.
    previous_ids = storage.read_assignments(persona_store, fitted_ids).combine_first(
        storage.read_member_segments(persona_store, fitted_ids)
    )
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

    stats, values = _profile_stats(
        persona_store, schema, vectors, cluster_ids, config, whole_fleet=not sampled
    )
    described = describe_segments(stats, segment_traits(values, stats, top=config.profile_traits))
    described = described[described["segment"] != NOISE]

    members = pd.DataFrame(
        {
            "device_id": vectors.device_ids,
            "cluster_id": cluster_ids,
            "distance": fit.distances,
            "space": vectors.space,
        }
    )
    centres = storage.centre_rows(vectors.space, matching.ids, fit.centres, now, _fit_settings(config))
    retired_because = f"{reason}; not matched to a segment of the new fit"
    fit_row = pd.DataFrame(
        {
            "space": [vectors.space],
            "fitted_at": [now],
            "settings": [_fit_settings(config)],
            "devices": [len(cluster_ids)],
        }
    )
    registry = storage.updated_registry(registry, described, now, retired_because)
    storage.write_fit(persona_store, fit_row, registry, centres, members)
    context.log.info(
        f"{fit.n_segments} segments ({fit.algorithm}, {fit.note}) fitted on {len(cluster_ids):,} of "
        f"{fleet:,} devices; {matching.matched} kept their id, {matching.new} new, "
        f"retired {matching.retired or 'none'}"
    )
    schema_changed = last_fit_space is None or _schema_part(last_fit_space) != _schema_part(vectors.space)
    return dg.MaterializeResult(
        check_results=[stability_check(aligned_previous, cluster_ids, config.min_stable_ari, schema_changed)],
        metadata=reporting.fit_metadata(
            fit, matching, described, cluster_ids, aligned_previous, fleet, vectors.space, reason
        ),
    )


class DeviceClustersConfig(dg.Config):
    page_rows: int = Field(
        default=100_000,
        ge=1_000,
        description="Devices read, assigned and written at a time: memory follows the page, not the fleet.",
    )


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(store_tables.device_clusters, store_tables.vector_index_clusters),
    # With device shards, a partition per shard: each shard's devices join the fit's segments.
    partitions_def=device_shard_only_partitions,
    deps=[segments, persona_vectors, persona_index],
    automation_condition=AFTER_UPSTREAM,
    group_name="segments",
    kinds={"qdrant", "sql"},
    pool=VECTOR_INDEX_POOL,
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            ASSIGNED_CHECK,
            asset="device_clusters",
            description="After the run, every device of its shard with a vector has a segment of the "
            "current fit; warns otherwise.",
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
    """A segment per device, from the last fit of `segments`: a device the fit segmented keeps the
    segment it gave it; every other device, and one whose vector changed since, joins the nearest
    centre. Only devices whose segment is not current are read: every device the day after a fit,
    the devices whose vector changed on the days between. Devices without a vector any more
    leave. Writes `device_clusters` and the `cluster_id` payload of the current Qdrant collection.
    With device shards a run assigns its shard's devices, so N shards leave the table of one."""
    shard = run_shard(context)
    schema = persona_config.feature_schema()
    spaces = require_one_vector_space(persona_store)
    now = pd.Timestamp.now(tz="UTC")
    gone = storage.read_gone(persona_store, shard)
    space = spaces[0] if spaces else None
    fit = None if space is None else storage.read_fit(persona_store, space, len(schema.dimension_names))
    if space is not None and fit is None:
        raise dg.Failure(
            f"no fit of segments in feature space {space}: materialize segments first", allow_retries=False
        )
    assigned, removed = 0, len(gone)
    pages = (
        []
        if fit is None
        else storage.read_to_assign(persona_store, shard, space, fit.fitted_at, config.page_rows)
    )
    for page in pages:
        rows = _assigned_rows(persona_store, page, fit, space, now).assign(fitted_at=fit.fitted_at)
        storage.write_assigned(persona_store, rows, gone)  # the devices gone leave with the first page
        assigned, gone = assigned + len(rows), []
    if gone:
        storage.write_assigned(persona_store, _assigned_frame([], [], [], space, now), gone)
    payloads_written = sync_cluster_payloads(persona_store, vector_index, shard)
    not_current = 0 if fit is None else storage.count_not_current(persona_store, shard, space, fit.fitted_at)
    check = reporting.assigned_check(not_current)
    sizes = storage.segment_sizes(persona_store)
    of_shard = "" if shard is None else f" of shard {shard.index}"
    to_fit = (
        ""
        if fit is None
        else f" to the {len(fit.cluster_ids)} segments fitted at {fit.fitted_at:%Y-%m-%d %H:%M} UTC"
    )
    context.log.info(f"assigned {assigned:,} devices{of_shard}{to_fit}; {removed:,} left")
    return dg.MaterializeResult(
        check_results=[check],
        metadata=reporting.assign_metadata(
            sizes,
            _active_segments(persona_store, sizes),
            assigned,
            removed,
            None if fit is None else fit.fitted_at,
            payloads_written,
            space,
        ),
    )


def _assigned_rows(
    store: PersonaStore, page: pd.DataFrame, fit: storage.StoredFit, space: str, now: pd.Timestamp
) -> pd.DataFrame:
    """The segment of each device of `page` (device_id, vector, computed_at): the one the fit gave
    it when the fit read its current vector, else its nearest centre."""
    device_ids = page["device_id"].tolist()
    members = storage.read_members(store, device_ids).reindex(device_ids)
    fitted = (
        members["cluster_id"].notna().to_numpy()
        & (members["space"] == space).to_numpy()
        & (page["computed_at"] <= fit.fitted_at).to_numpy()
    )
    cluster_ids = np.where(fitted, members["cluster_id"].fillna(NOISE).to_numpy(), NOISE).astype(np.int64)
    distances = members["distance"].fillna(0.0).to_numpy(dtype=np.float64, copy=True)
    others = np.flatnonzero(~fitted)
    if len(others):
        if not len(fit.centres):
            raise dg.Failure(
                "the last fit found no segment (every device noise): fit the segments anew",
                allow_retries=False,
            )
        matrix = persona_storage.decode_vectors(page["vector"].iloc[others], fit.centres.shape[1])
        nearest, distance = nearest_centre(matrix.astype(np.float64), fit.centres)
        cluster_ids[others] = fit.cluster_ids[nearest]
        distances[others] = distance
    return _assigned_frame(device_ids, cluster_ids, distances, space, now)


def _assigned_frame(
    device_ids: list[str],
    cluster_ids: np.ndarray | list,
    distances: np.ndarray | list,
    space: str | None,
    now: pd.Timestamp,
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "device_id": pd.Series(device_ids, dtype=object),
            "cluster_id": np.asarray(cluster_ids, dtype=np.int64),
            "distance": np.asarray(distances, dtype=np.float64),
            "space": space,
            "clustered_at": now,
        }
    )


def _profile_stats(
    store: PersonaStore,
    schema: FeatureSchema,
    vectors: persona_storage.StoredVectors,
    cluster_ids: np.ndarray,
    config: SegmentsConfig,
    whole_fleet: bool,
) -> tuple[SegmentStats, ReadableValues]:
    """The segments' typical values, from the profiles of every device of the fit or, when it holds
    more than `profile_sample_size`, of a sample stratified by segment; sizes are the fit's."""
    sample = stratified_sample(cluster_ids, config.profile_sample_size, config.random_seed)
    if whole_fleet and len(sample) == len(cluster_ids):
        profiles = persona_storage.read_profiles(store, columns=READABLE_COLUMNS)
    else:
        sampled = vectors.device_ids[sample].tolist()
        profiles = persona_storage.read_profiles_of(store, sampled, READABLE_COLUMNS)
    frame = vectors.frame().iloc[sample]
    values = readable_values(profiles, schema, vectors.device_ids[sample], frame)
    stats = segment_stats(values, cluster_ids[sample])
    sizes = pd.Series(cluster_ids).value_counts().sort_index()
    return replace(stats, sizes=sizes.rename_axis(stats.sizes.index.name).rename(stats.sizes.name)), values


def _fit_settings(config: SegmentsConfig) -> str:
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
    config: SegmentsConfig, store: PersonaStore, schema: FeatureSchema, now: pd.Timestamp
) -> tuple[str | None, storage.StoredFit | None]:
    """Why this run fits anew (see `refit_reason`), or None and the fit that stands."""
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
    if stored is not None and stored.settings != _fit_settings(config):
        return "the clustering settings changed", None
    reason = refit_reason(
        algorithm=config.algorithm,
        forced=config.refit,
        refit_every_days=config.refit_every_days,
        refit_changed_share=config.refit_changed_share,
        fitted_at=None if stored is None else stored.fitted_at.to_datetime64(),
        now=now.to_datetime64(),
        changed=0 if stored is None else storage.count_changed_since_fit(store, stored.fitted_at),
        devices=persona_storage.count_vectors(store),
    )
    return reason, stored


def require_current_space(vectors: persona_storage.StoredVectors, schema: FeatureSchema) -> None:
    """Stored vectors must be in the configured schema's space (their dimensions name the keys)."""
    if vectors.dimension_names != schema.dimension_names:
        raise dg.Failure(
            f"persona_vectors were built in feature space {vectors.space}, not in the configured "
            f"schema's ({schema.version}, {len(schema.dimension_names)} dimensions): "
            "materialize persona_vectors first",
            allow_retries=False,
        )


def _active_segments(store: PersonaStore, sizes: pd.Series) -> pd.DataFrame:
    """The active segments with a device today: segment, name, devices (today's), traits."""
    registry = storage.read_segment_registry(store)
    registry["devices"] = registry["cluster_id"].map(sizes).fillna(0).astype("int64")
    active = registry[registry["active"] & (registry["devices"] > 0)]
    return active.rename(columns={"cluster_id": "segment"})[["segment", "name", "devices", "traits"]]
