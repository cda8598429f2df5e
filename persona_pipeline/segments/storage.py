"""Reads and writes of the segments domain in the persona store."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

from persona_pipeline.personas.storage import devices_without_a_vector
from persona_pipeline.resources.persona_store import PersonaStore, as_utc
from persona_pipeline.store.tables import (
    device_clusters,
    persona_vectors,
    segment_centres,
    segments,
    vector_index_clusters,
    vector_index_state,
)


def read_assignments(store: PersonaStore, device_ids: list[str] | None = None) -> pd.Series:
    """The current cluster_id of each device (device_id index); of `device_ids` only when given."""
    c = device_clusters.c
    query = sa.select(c.device_id, c.cluster_id)
    if device_ids is None:
        frame = store.read_frame(query)
    else:
        frame = store.read_frame_in(query, c.device_id, device_ids)
    return frame.set_index("device_id")["cluster_id"].astype("int64")


def read_segment_registry(store: PersonaStore) -> pd.DataFrame:
    """Every segment id ever given out, typed even when there is none (a mask of `active` works)."""
    frame = store.read_frame(sa.select(segments).order_by(segments.c.cluster_id))
    for column in ("first_seen_at", "last_seen_at"):
        frame[column] = as_utc(frame[column])
    return frame.astype({"cluster_id": "int64", "devices": "int64", "active": bool})


def next_segment_id(registry: pd.DataFrame, assignments: pd.Series) -> int:
    """Ids are never reused: a new segment gets one above every id ever given out."""
    used = [int(registry["cluster_id"].max())] if not registry.empty else []
    used += [int(assignments.max())] if not assignments.empty else []
    return max([0, *used]) + 1


def write_clustering(
    store: PersonaStore,
    assignments: pd.DataFrame,
    registry: pd.DataFrame,
    centres: pd.DataFrame,
) -> None:
    """After a full fit: replace `device_clusters` (every device), the `segments` registry and
    the fit's `segment_centres` (space, cluster_id, centre, fitted_at) in one transaction."""
    with store.begin() as connection:
        connection.execute(device_clusters.delete())
        store.insert_frame(connection, device_clusters, assignments)
        connection.execute(segments.delete())
        store.insert_frame(connection, segments, registry)
        connection.execute(segment_centres.delete())
        store.insert_frame(connection, segment_centres, centres)


@dataclass
class StoredFit:
    """The last full fit of a feature space: segment ids and their centres (rows align)."""

    cluster_ids: np.ndarray
    centres: np.ndarray
    fitted_at: pd.Timestamp
    settings: str


def centre_rows(
    space: str, cluster_ids: np.ndarray, centres: np.ndarray, fitted_at: pd.Timestamp, settings: str
) -> pd.DataFrame:
    contiguous = np.ascontiguousarray(centres, dtype="<f8")
    return pd.DataFrame(
        {
            "space": space,
            "cluster_id": np.asarray(cluster_ids, dtype=np.int64),
            "centre": [row.tobytes() for row in contiguous],
            "fitted_at": fitted_at,
            "settings": settings,
        }
    )


def read_fit(store: PersonaStore, space: str, dimensions: int) -> StoredFit | None:
    c = segment_centres.c
    frame = store.read_frame(
        sa.select(c.cluster_id, c.centre, c.fitted_at, c.settings)
        .where(c.space == space)
        .order_by(c.cluster_id)
    )
    if frame.empty:
        return None
    centres = np.frombuffer(b"".join(frame["centre"].tolist()), dtype="<f8").reshape(len(frame), dimensions)
    return StoredFit(
        cluster_ids=frame["cluster_id"].to_numpy(dtype=np.int64),
        centres=centres,
        fitted_at=as_utc(frame["fitted_at"]).min(),
        settings=str(frame["settings"].iloc[0]),
    )


def read_fitted_at(store: PersonaStore, space: str) -> pd.Timestamp | None:
    """When the segments of `space` were last fitted (None: never)."""
    c = segment_centres.c
    fitted_at = store.scalar(sa.select(sa.func.min(c.fitted_at)).where(c.space == space))
    return None if fitted_at is None else as_utc(pd.Series([fitted_at])).iloc[0]


def read_last_fit_space(store: PersonaStore) -> str | None:
    """The feature space of the newest full fit, if any."""
    c = segment_centres.c
    frame = store.read_frame(sa.select(c.space).order_by(c.fitted_at.desc()).limit(1))
    return None if frame.empty else str(frame["space"].iloc[0])


def read_unassigned(store: PersonaStore) -> tuple[list[str], list[str]]:
    """Devices whose vector is newer than their segment (or that have none), and devices with a
    segment but no vector any more. Two joins on primary keys, in the database."""
    v, c = persona_vectors.c, device_clusters.c
    changed = store.read_frame(
        sa.select(v.device_id)
        .select_from(persona_vectors.outerjoin(device_clusters, v.device_id == c.device_id))
        .where(sa.or_(c.device_id.is_(None), v.computed_at > c.clustered_at, v.space != c.space))
        .order_by(v.device_id)
    )
    return changed["device_id"].tolist(), devices_without_a_vector(store, device_clusters)


def count_devices(store: PersonaStore) -> int:
    return int(store.scalar(sa.select(sa.func.count()).select_from(device_clusters)) or 0)


def write_assigned(store: PersonaStore, assigned: pd.DataFrame, gone: list[str]) -> pd.Series:
    """Between refits: replace the rows of the assigned and the gone devices, and bring each
    segment's device count in the registry up to date; returns the counts (cluster_id index)."""
    ids = [*assigned["device_id"].tolist(), *gone]
    c = device_clusters.c
    with store.begin() as connection:
        store.delete_in(connection, device_clusters, c.device_id, ids)
        store.insert_frame(connection, device_clusters, assigned)
        counts = store.read_frame(
            sa.select(c.cluster_id, sa.func.count().label("devices")).group_by(c.cluster_id), connection
        ).set_index("cluster_id")["devices"]
        for cluster_id, devices in counts.items():
            connection.execute(
                segments.update().where(segments.c.cluster_id == int(cluster_id)).values(devices=int(devices))
            )
        connection.execute(
            segments.update().where(segments.c.cluster_id.not_in(counts.index.tolist())).values(devices=0)
        )
    return counts


def updated_registry(
    registry: pd.DataFrame, described: pd.DataFrame, now: pd.Timestamp, retired_because: str = ""
) -> pd.DataFrame:
    """Today's segments become active with their profile; ids not seen today stay, inactive. An id
    active until now is retired with `retired_because`; one retired before keeps its reason."""
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
    was_active = (
        merged["cluster_id"].map(previous["active"]).fillna(False).astype(bool) if len(previous) else False
    )
    earlier = merged["cluster_id"].map(previous["retired_reason"]) if "retired_reason" in previous else None
    merged["retired_reason"] = np.where(
        seen, None, np.where(was_active, retired_because or "not found by the new fit", earlier)
    )
    return merged


def read_stale_payloads(store: PersonaStore, collection: str) -> pd.DataFrame:
    """The points of `collection` whose `cluster_id` payload is not the table's: never written, a
    different segment, or the point rewritten since (persona_index replaces a point's payload
    whole). Columns device_id, cluster_id (the table's), point_written (the point's write); one
    query."""
    d, s, p = device_clusters.c, vector_index_state.c, vector_index_clusters.c
    return store.read_frame(
        sa.select(d.device_id, d.cluster_id, s.written.label("point_written"))
        .select_from(
            device_clusters.join(
                vector_index_state, sa.and_(s.device_id == d.device_id, s.collection == collection)
            ).outerjoin(
                vector_index_clusters, sa.and_(p.device_id == d.device_id, p.collection == collection)
            )
        )
        .where(
            sa.or_(
                p.device_id.is_(None),
                p.cluster_id.is_distinct_from(d.cluster_id),
                p.point_written.is_distinct_from(s.written),
            )
        )
        .order_by(d.device_id)
    )


def record_payload_clusters(store: PersonaStore, collection: str, written: pd.DataFrame) -> None:
    """After a payload write: `written` (device_id, cluster_id, point_written) is what the points of
    `collection` now carry. Forgets the payloads of collections the index no longer holds."""
    c = vector_index_clusters.c
    with store.begin() as connection:
        PersonaStore.delete_in(
            connection,
            vector_index_clusters,
            c.device_id,
            written["device_id"].tolist(),
            c.collection == collection,
        )
        store.insert_frame(connection, vector_index_clusters, written.assign(collection=collection))
        held = sa.select(vector_index_state.c.collection).distinct()
        connection.execute(vector_index_clusters.delete().where(c.collection.not_in(held)))
