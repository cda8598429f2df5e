"""Personas: profiles merged from updates, weighted persona vectors, and their Qdrant index."""

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.automation import AFTER_UPSTREAM, after_upstream_updates
from persona_pipeline.device_shards import DeviceShard, device_hash
from persona_pipeline.metadata import OWNERS, add_counts_per_partition, table_metadata
from persona_pipeline.partitions import (
    device_day_backfill,
    device_day_partitions,
    device_shard_only_partitions,
    on_device_day_partitions,
    run_days_and_shard,
    run_shard,
)
from persona_pipeline.personas import reporting, storage
from persona_pipeline.personas.index_verification import SAMPLE_SIZE, collection_problem
from persona_pipeline.personas.profiles import (
    device_customers,
    latest_per_device_key,
    value_changes,
    values_not_merged,
)
from persona_pipeline.personas.reporting import ONE_POINT_CHECK, VECTOR_COUNT_CHECK
from persona_pipeline.personas.vectors import ComputedVectors, build_persona_vectors
from persona_pipeline.personas.weights import WeightsNotRecorded, configured_weights_recorded, current_weights
from persona_pipeline.resources import PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.resources.persona_store import int64_fingerprint
from persona_pipeline.resources.vector_index import (
    COLLECTION_PREFIX,
    VECTOR_INDEX_POOL,
    VectorIndexError,
    VectorStore,
    persona_collections,
    point_ids,
)
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.store import tables as store_tables

MERGED_CHECK = "merged_values_in_profiles"
MERGE_SAMPLE_DEVICES = 500
# The feedback domain's asset, named by key: personas sits below feedback in the imports.
KEY_WEIGHTS = dg.AssetKey("key_weights")


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(store_tables.device_profiles, store_tables.profile_changes),
    partitions_def=device_day_partitions,
    backfill_policy=device_day_backfill,
    deps=["index_updates"],
    group_name="personas",
    kinds={"pandas", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            MERGED_CHECK,
            asset="device_profiles",
            description="The merge landed: for a fixed sample of the devices updated (at most "
            f"{MERGE_SAMPLE_DEVICES:,}), every value read is in the profiles, or a newer one.",
        )
    ],
)
def device_profiles(context: dg.AssetExecutionContext, persona_store: PersonaStore) -> dg.MaterializeResult:
    """Latest value per (device, key) by event time. Merging is order-independent and idempotent:
    days can be materialized in any order, or twice, and leave the same table. With device shards,
    a run of a (day, shard) merges that shard's file of the day: its devices only."""
    days, shard = run_days_and_shard(context)
    updates = storage.read_updates_for_days(persona_store, days, shard)
    if len(days) > 1:
        add_counts_per_partition(context, storage.count_updates_by_day(persona_store, days))
    latest = latest_per_device_key(updates)
    storage.merge_into_profiles(persona_store, latest)
    rows, devices = storage.profile_counts(persona_store)
    updated = int(latest["device_id"].nunique())
    sample = _every_kth(latest["device_id"].unique(), MERGE_SAMPLE_DEVICES)
    sampled = latest[latest["device_id"].isin(sample)]
    missing = values_not_merged(sampled, storage.read_profiles_of(persona_store, sample))
    merged = dg.AssetCheckResult(
        check_name=MERGED_CHECK,
        passed=missing == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"values_checked": len(sampled), "values_missing_or_older": missing},
    )
    return dg.MaterializeResult(
        check_results=[merged],
        metadata={
            "updates_read": dg.MetadataValue.int(len(updates)),
            "latest_values_merged": dg.MetadataValue.int(len(latest)),
            "devices_updated": dg.MetadataValue.int(updated),
            "profile_rows": dg.MetadataValue.int(rows),
            "devices": dg.MetadataValue.int(devices),
        },
    )


def _every_kth(device_ids: np.ndarray, size: int) -> list[str]:
    """At most `size` of `device_ids`, evenly spread in id order (the same sample on a re-run)."""
    ordered = np.sort(device_ids.astype(object))
    if len(ordered) <= size:
        return ordered.tolist()
    return ordered[np.linspace(0, len(ordered) - 1, size).astype(np.int64)].tolist()


# Above this share of the fleet, reading every profile costs less than looking devices up.
INCREMENTAL_MAX_SHARE = 0.25
# Profile rows a run computing every device holds at a time (about 130,000 devices at 7.5 keys).
PROFILE_PAGE_ROWS = 1_000_000


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(
        store_tables.persona_vectors, store_tables.persona_dimensions, store_tables.persona_vector_runs
    ),
    # With device shards, a partition per shard, over that shard's profiles of every day.
    partitions_def=device_shard_only_partitions,
    # The live weights come from key_weights, which learns from the answers to the offers these
    # vectors lead to: the feedback loop. A new live version rebuilds the vectors through
    # key_weights_sensor (a refresh that keeps the live version does not).
    deps=[on_device_day_partitions(device_profiles), KEY_WEIGHTS],
    # On a new deployment the vectors wait until key_weights has recorded the configured weights
    # (configured_weights_sensor asks for it), then run once for the profiles that came meanwhile.
    automation_condition=after_upstream_updates(ignore=dg.AssetSelection.assets(KEY_WEIGHTS))
    & ~dg.AutomationCondition.any_deps_match(dg.AutomationCondition.missing()).allow(
        dg.AssetSelection.assets(KEY_WEIGHTS)
    ),
    group_name="personas",
    kinds={"numpy", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            VECTOR_COUNT_CHECK,
            asset="persona_vectors",
            description="The stored vectors are as many as the devices the run counts (computed or carried "
            "over from the last run): an incremental run lost or duplicated none.",
        )
    ],
)
def persona_vectors(
    context: dg.AssetExecutionContext, persona_store: PersonaStore, persona_config: PersonaConfig
) -> dg.MaterializeResult:
    """One weighted vector per profiled device, in the feature space of the current schema and
    the newest `key_weights` version. Only the devices whose vector may have changed are computed:
    those whose profile changed since the last run, and those a time-relative dimension (moved
    city within N days) may flip for; every device when the feature space changes. Only devices
    whose vector did change are rewritten. A run that computes every device reads the profiles a
    page of devices at a time (PROFILE_PAGE_ROWS rows): its memory follows the page and the
    changed devices' encoded rows, not the fleet's profiles. With device shards, a run computes its
    shard's devices at the fleet's newest event time, so N shards leave the vectors of one."""
    shard = run_shard(context)
    erasures_at_start = storage.count_erasures(persona_store)
    schema = persona_config.feature_schema()
    try:
        weights = current_weights(persona_store)
    except WeightsNotRecorded as unrecorded:
        raise dg.Failure(str(unrecorded), allow_retries=False) from unrecorded
    configured_recorded = configured_weights_recorded(persona_store, schema.initial_weights())
    if not configured_recorded:
        dg.get_dagster_logger().warning(
            f"the configured key weights were edited and are not recorded yet: v{weights.version} is "
            "used until key_weights records them (configured_weights_sensor asks for it)"
        )
    space = f"{schema.version}-w{weights.version}"
    changes = storage.read_profile_changes(persona_store, shard)
    last = storage.read_last_vector_run(persona_store, shard)
    # One shard's changed profiles need not hold the fleet's newest value: read it.
    fleet_newest = None if shard is None else storage.read_latest_observed_at(persona_store)
    selection = None
    if last is not None and last.space == space:
        selection = _changed_devices(persona_store, schema, changes, last, shard, fleet_newest)
    if selection is None:
        as_of = fleet_newest or storage.read_latest_observed_at(persona_store) or pd.Timestamp.now(tz="UTC")
        changed, _ = _changed_within_days(persona_store, schema, as_of, None, shard)
        previous = storage.read_vector_fingerprints(persona_store, shard=shard)
        pages = storage.read_profile_pages(persona_store, shard, PROFILE_PAGE_ROWS)
    else:
        as_of, changed, candidates, profiles = selection
        previous = storage.read_vector_fingerprints(persona_store, candidates)
        pages = [profiles]

    computed = ComputedVectors(previous.index, len(schema.dimension_names))
    changed_rows = []
    for profiles in pages:
        vectors = build_persona_vectors(
            profiles, device_customers(profiles), schema, weights.weights, changed
        )
        fingerprints = int64_fingerprint(
            pd.DataFrame(vectors.matrix).assign(customer_id=vectors.customer_ids, space=space)
        )
        stale = previous.reindex(vectors.device_ids).to_numpy() != fingerprints
        changed_rows.append(
            pd.DataFrame(
                {
                    "device_id": vectors.device_ids[stale],
                    "customer_id": vectors.customer_ids[stale],
                    "space": space,
                    "weights_version": weights.version,
                    "vector": storage.encode_vectors(vectors.matrix[stale]),
                    "fingerprint": fingerprints[stale],
                }
            )
        )
        computed.add(vectors, int(stale.sum()))
    # The pages' rows (each vector encoded, 320 bytes) go in at once, in one short transaction:
    # readers never see two feature spaces, and no writer waits while pages are computed.
    rows = pd.concat(changed_rows, ignore_index=True) if changed_rows else pd.DataFrame(columns=["device_id"])
    rows["computed_at"] = pd.Timestamp.now(tz="UTC")
    rows["device_hash"] = device_hash(rows["device_id"])
    removed = computed.not_computed()
    storage.write_vectors(persona_store, rows, removed)
    dimension_weights = schema.dimension_weights(weights.weights)
    dimensions = pd.DataFrame(
        {
            "position": np.arange(len(schema.dimensions)),
            "name": schema.dimension_names,
            "weight_key": [d.weight_key for d in schema.dimensions],
            "weight": dimension_weights,
        }
    )
    storage.write_dimensions(persona_store, space, dimensions)
    counted = computed.devices
    if selection is not None:
        counted = last.devices + computed.new_devices - len(removed)
    # The run record keeps what the table holds, so a run stopped between the vectors and this
    # record is counted right by the next one (after one warning of the check below).
    devices = storage.count_vectors(persona_store, shard)
    run = storage.VectorRun(space, as_of, devices)
    if not storage.record_vector_run(persona_store, run, shard, erasures_at_start):
        context.log.warning("an erasure completed during this run: the next run computes every device")
    storage.clear_profile_changes(persona_store, changes)

    return dg.MaterializeResult(
        check_results=[reporting.vector_count_check(devices, counted)],
        metadata=reporting.vectors_metadata(
            devices=devices,
            computed=computed.devices,
            nonzero_share=computed.nonzero_share(),
            every_device=selection is None,
            rewritten=computed.rewritten,
            removed=len(removed),
            schema=schema,
            space=space,
            weights=weights,
            as_of=as_of,
            changed=changed,
            dimensions=dimensions,
            configured_recorded=configured_recorded,
        ),
    )


def require_one_vector_space(store: PersonaStore) -> list[str]:
    """The feature spaces of the stored vectors, one or none; several (shards rebuilt with new
    weights beside shards not yet) stop the fleet-wide step at once, without retries."""
    spaces = storage.read_vector_spaces(store)
    if len(spaces) > 1:
        raise dg.Failure(storage.several_spaces(spaces), allow_retries=False)
    return spaces


def _changed_devices(
    store: PersonaStore,
    schema,
    changes: storage.ProfileChanges,
    last: storage.VectorRun,
    shard: DeviceShard | None,
    fleet_newest: pd.Timestamp | None,
) -> tuple[pd.Timestamp, dict[str, set[str]], list[str], pd.DataFrame] | None:
    """Since the shard's last run in the same feature space: the newest event time, the devices
    that changed within each `changed_within_days` window, the devices whose vector may differ (a
    profile change, or a flag that differs between the two event times) and their profile rows.
    None when they are too many for looking them up to pay off.

    Unsharded, only profile_changes' devices have rows that changed, so the newest event time is
    the last run's or one of theirs (an erasure forgets the runs: every device is computed); a
    shard takes the fleet's, `fleet_newest`."""
    profiles = storage.read_profiles_of(store, changes.devices)
    newest = [last.as_of, profiles["observed_at"].max() if not profiles.empty else None, fleet_newest]
    as_of = max(moment for moment in newest if moment is not None and not pd.isna(moment))
    changed, flipped = _changed_within_days(store, schema, as_of, last.as_of, shard)
    others = sorted(flipped - set(changes.devices))
    if len(changes.devices) + len(others) > INCREMENTAL_MAX_SHARE * last.devices:
        return None
    if others:
        profiles = pd.concat([profiles, storage.read_profiles_of(store, others)], ignore_index=True)
    return as_of, changed, sorted([*changes.devices, *others]), profiles


def _changed_within_days(
    store: PersonaStore,
    schema,
    as_of: pd.Timestamp,
    previous_as_of: pd.Timestamp | None,
    shard: DeviceShard | None,
) -> tuple[dict[str, set[str]], set[str]]:
    """Per `changed_within_days` metric, the devices (of `shard`, when given) whose key changed
    within its window; and the devices whose flag may differ from the one computed at
    `previous_as_of` (a change inside that run's window: the flag of a device that sent nothing
    since turns off as time passes)."""
    changed: dict[str, set[str]] = {}
    flipped: set[str] = set()
    for derived in schema.derived:
        if derived.kind != "changed_within_days":
            continue
        window = pd.Timedelta(days=derived.days)
        start = as_of - window if previous_as_of is None else min(as_of, previous_as_of) - window
        history = storage.read_key_history(store, derived.key, start.to_pydatetime(), shard)
        changed[derived.name] = set(value_changes(history, as_of - window)["device_id"])
        if previous_as_of is not None:
            flipped |= changed[derived.name] | set(
                value_changes(history, previous_as_of - window)["device_id"]
            )
    return changed, flipped


class PersonaIndexConfig(dg.Config):
    batch_size: int = Field(default=512, ge=1, le=65_536, description="Points per upsert request to Qdrant.")
    keep_collections: int = Field(
        default=2,
        ge=2,
        le=100,
        description="Persona collections kept: the current one, the previous one (for a rollback) "
        "and, above 2, older ones.",
    )


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(store_tables.vector_index_state),
    deps=[persona_vectors],
    automation_condition=AFTER_UPSTREAM,
    group_name="personas",
    kinds={"qdrant"},
    pool=VECTOR_INDEX_POOL,
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            ONE_POINT_CHECK,
            asset="persona_index",
            description="The alias `personas` resolves to a collection with exactly one point per device, "
            "whose sampled points hold the vectors of persona_vectors (after any repair).",
        )
    ],
)
def persona_index(
    context: dg.AssetExecutionContext,
    config: PersonaIndexConfig,
    persona_store: PersonaStore,
    vector_index: VectorIndex,
) -> dg.MaterializeResult:
    """Persona vectors in Qdrant: a collection per feature space (schema + weights version),
    point id uuid5(device_id). Writes only the devices whose vector changed since the
    collection last saw them; a new feature space fills a new collection, then the alias
    `personas` is swapped to it atomically. The collection is then verified (point count, a
    sample read back with its vectors); a damaged one is rewritten, or rebuilt when it cannot be
    read, and the metadata says so."""
    spaces = require_one_vector_space(persona_store)
    space = spaces[0] if spaces else None
    if space is None:
        return reporting.no_vectors_result()
    collection = f"{COLLECTION_PREFIX}{space}"
    dimensions = storage.read_dimension_count(persona_store, space)
    devices, weights_version = storage.read_vector_overview(persona_store)
    sample = storage.read_vector_sample(persona_store, SAMPLE_SIZE)
    sample_ids = sample["device_id"].tolist()
    sample_vectors = storage.decode_vectors(sample["vector"], dimensions)
    # A server keeps its own storage sound, and an error there is most likely the connection:
    # only an embedded collection that cannot be read is rebuilt.
    rebuild_unreadable = not vector_index.url
    repairs: list[str] = []

    with vector_index.open() as index:
        created = _open_collection(index, collection, dimensions, rebuild_unreadable, repairs)
        recorded = storage.count_index_state(persona_store, collection) if created and not repairs else 0
        if recorded:
            repairs.append(f"{collection} was missing, {recorded} points recorded as written: wrote it anew")
        written, deleted = _write_points(
            persona_store, index, collection, dimensions, config.batch_size, created
        )
        problem = collection_problem(index, collection, devices, sample_ids, sample_vectors)
        if problem is not None and not problem.needs_rebuild:
            repairs.append(f"{problem.description}: rewrote every point")
            written += _write_points(persona_store, index, collection, dimensions, config.batch_size, True)[0]
            problem = collection_problem(index, collection, devices, sample_ids, sample_vectors)
        if problem is not None and (rebuild_unreadable or problem.kind == "extra"):
            repairs.append(f"{problem.description}: rebuilt the collection")
            index.drop_collection(collection)
            index.create_collection(collection, dimensions)
            written += _write_points(persona_store, index, collection, dimensions, config.batch_size, True)[0]
            problem = collection_problem(index, collection, devices, sample_ids, sample_vectors)
        previous = index.swap_alias(vector_index.alias, collection)
        dropped = _drop_old_collections(
            index, keep=config.keep_collections, current=collection, previous=previous
        )
        storage.forget_collections(persona_store, dropped)
        points = index.count(vector_index.alias)
    if previous != collection:
        context.log.info(f"alias {vector_index.alias}: {previous} -> {collection}")
    for repair in repairs:
        context.log.warning(f"vector index at {vector_index.location}: {repair}")

    return dg.MaterializeResult(
        metadata=reporting.index_metadata(
            collection=collection,
            alias=vector_index.alias,
            previous=previous,
            location=vector_index.location,
            written=written,
            deleted=deleted,
            points=points,
            dimensions=dimensions,
            weights_version=weights_version,
            dropped=dropped,
            verified=len(sample_ids),
            repairs=repairs,
        ),
        check_results=[reporting.one_point_check(points, devices, problem, repairs)],
    )


def _open_collection(
    index: VectorStore, collection: str, dimensions: int, rebuild_unreadable: bool, repairs: list[str]
) -> bool:
    """Make sure the collection exists and opens; True when it is new (empty). A collection that
    exists but cannot be opened is dropped and made anew when `rebuild_unreadable`."""
    try:
        created = index.ensure_collection(collection, dimensions)
        index.count(collection)
        return created
    except VectorIndexError as exc:
        if not rebuild_unreadable or collection not in index.collections():
            raise
        repairs.append(f"{collection} cannot be opened: {exc.detail}: rebuilt the collection")
    index.drop_collection(collection)
    index.create_collection(collection, dimensions)
    return True


# Devices read, written and recorded at a time: a fleet-wide write holds one page in memory.
INDEX_PAGE_ROWS = 100_000
_NO_POINTS = pd.DataFrame({"device_id": pd.Series(dtype=object), "fingerprint": pd.Series(dtype="int64")})


def _write_points(
    store: PersonaStore, index: VectorStore, collection: str, dimensions: int, batch_size: int, whole: bool
) -> tuple[int, int]:
    """Write the points `collection` lacks (every device's when `whole`) and delete the points of
    devices without a vector; record them in vector_index_state, a page of devices at a time (a
    write stopped midway keeps the pages recorded). Returns (written, deleted)."""
    # A new or rebuilt collection holds nothing, whatever state an old one left.
    gone = [] if whole else storage.read_indexed_without_vector(store, collection)
    deleted = index.delete(collection, point_ids(gone))
    storage.write_index_state(store, collection, _NO_POINTS, gone, whole=whole)
    written = 0
    for page in storage.read_unindexed_vectors(store, None if whole else collection, INDEX_PAGE_ROWS):
        # The cluster_id payload is device_clusters' to write: it finds these points rewritten.
        payloads = [
            {"device_id": d, "customer_id": None if pd.isna(c) else c, "weights_version": int(w)}
            for d, c, w in zip(page["device_id"], page["customer_id"], page["weights_version"], strict=True)
        ]
        blobs = storage.read_vector_blobs(store, page["device_id"].tolist())
        written += index.upsert(
            collection,
            point_ids(page["device_id"]),
            storage.decode_vectors(blobs, dimensions),
            payloads,
            batch_size,
        )
        storage.write_index_state(store, collection, page[["device_id", "fingerprint"]], [])
    return written, deleted


def _drop_old_collections(index: VectorStore, keep: int, current: str, previous: str | None) -> list[str]:
    """Drop persona collections beyond the newest `keep`, never the current or previous one."""
    protected = {current, previous}
    candidates = [c for c in persona_collections(index) if c not in protected]
    room = max(keep - len({c for c in protected if c}), 0)
    # Collection names end in the weights version: keep the newest of the rest.
    candidates.sort(
        key=lambda name: int(name.rsplit("-w", 1)[-1]) if name.rsplit("-w", 1)[-1].isdigit() else -1
    )
    dropped = candidates[: max(len(candidates) - room, 0)]
    for name in dropped:
        index.drop_collection(name)
    return dropped
