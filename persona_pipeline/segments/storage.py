"""Reads and writes of the segments domain in the persona store."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.resources.persona_store import PersonaStore, as_utc
from persona_pipeline.store.tables import device_clusters, segments


def read_assignments(store: PersonaStore) -> pd.Series:
    """The current cluster_id of each device (device_id index)."""
    c = device_clusters.c
    frame = store.read_frame(sa.select(c.device_id, c.cluster_id))
    return frame.set_index("device_id")["cluster_id"].astype("int64")


def read_segment_registry(store: PersonaStore) -> pd.DataFrame:
    frame = store.read_frame(sa.select(segments).order_by(segments.c.cluster_id))
    for column in ("first_seen_at", "last_seen_at"):
        frame[column] = as_utc(frame[column])
    return frame


def next_segment_id(registry: pd.DataFrame, assignments: pd.Series) -> int:
    """Ids are never reused: a new segment gets one above every id ever given out."""
    used = [int(registry["cluster_id"].max())] if not registry.empty else []
    used += [int(assignments.max())] if not assignments.empty else []
    return max([0, *used]) + 1


def write_clustering(store: PersonaStore, assignments: pd.DataFrame, registry: pd.DataFrame) -> None:
    """Replace `device_clusters` (every device is re-clustered each run) and the `segments`
    registry together, in one transaction."""
    with store.begin() as connection:
        connection.execute(device_clusters.delete())
        store.insert_frame(connection, device_clusters, assignments)
        connection.execute(segments.delete())
        store.insert_frame(connection, segments, registry)


def updated_registry(registry: pd.DataFrame, described: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """Today's segments become active with their profile; ids not seen today stay, inactive."""
    today = described.rename(columns={"segment": "cluster_id"})[["cluster_id", "name", "devices", "traits"]]
    merged = registry.drop(columns=["name", "devices", "traits"], errors="ignore").merge(
        today, on="cluster_id", how="outer"
    )
    seen = merged["cluster_id"].isin(today["cluster_id"])
    merged["active"] = seen
    first, last = (
        pd.to_datetime(merged[column], utc=True).astype("datetime64[ns, UTC]")
        for column in ("first_seen_at", "last_seen_at")
    )
    merged["first_seen_at"] = first.fillna(now)
    merged["last_seen_at"] = last.where(~seen, now)
    previous = registry.set_index("cluster_id")
    for column in ("name", "traits"):
        merged[column] = merged[column].fillna(
            merged["cluster_id"].map(previous[column]) if len(previous) else ""
        )
    merged["devices"] = merged["devices"].where(seen, 0).astype("int64")
    return merged
