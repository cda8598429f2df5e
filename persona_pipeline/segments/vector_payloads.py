"""The `cluster_id` payload of the Qdrant points: written by device_clusters alone."""

from __future__ import annotations

import pandas as pd

from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.resources import PersonaStore, VectorIndex
from persona_pipeline.resources.vector_index import point_ids
from persona_pipeline.segments import storage


def sync_cluster_payloads(
    store: PersonaStore, vector_index: VectorIndex, shard: DeviceShard | None = None
) -> int:
    """Bring the `cluster_id` payload of the current collection's points in line with the table:
    only points whose recorded payload differs (or that persona_index rewrote since) are written,
    found by a join in the store, so a run that failed half-way is caught up; one request per
    segment. With `shard`, only that shard's points, so shards' runs side by side write apart.
    Returns the points written."""
    with vector_index.open() as index:
        collection = index.alias_target(vector_index.alias)
        if collection is None:
            return 0
        stale = storage.read_stale_payloads(store, collection)
        if shard is not None:
            stale = stale[shard.holds(stale["device_id"])]
        if stale.empty:
            return 0
        ids = pd.Series(point_ids(stale["device_id"]), index=stale.index)
        by_cluster = ids.groupby(stale["cluster_id"].to_numpy()).agg(list)
        written = index.set_payload_values(
            collection, "cluster_id", {int(k): v for k, v in by_cluster.items()}
        )
    storage.record_payload_clusters(store, collection, stale[["device_id", "cluster_id", "point_written"]])
    return written
