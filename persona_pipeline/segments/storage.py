"""Reads and writes of the segments domain in the persona store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.personas.storage import devices_without_a_vector
from persona_pipeline.resources.persona_store import PersonaStore, as_utc
from persona_pipeline.store.tables import (
    device_clusters,
    persona_vectors,
    segment_centres,
    segment_fits,
    segment_members,
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


def write_fit(
    store: PersonaStore,
    fit: pd.DataFrame,
    registry: pd.DataFrame,
    centres: pd.DataFrame,
    members: pd.DataFrame,
) -> None:
    """After a full fit: replace the fit (`segment_fits`: space, fitted_at, settings, devices),
    the `segments` registry, the fit's `segment_centres` (space, cluster_id, centre, fitted_at,
    settings) and its `segment_members` (device_id, cluster_id, distance, space) in one
    transaction. device_clusters then assigns every device."""
    with store.begin() as connection:
        connection.execute(segment_fits.delete())
        store.insert_frame(connection, segment_fits, fit)
        connection.execute(segments.delete())
        store.insert_frame(connection, segments, registry)
        connection.execute(segment_centres.delete())
        store.insert_frame(connection, segment_centres, centres)
        connection.execute(segment_members.delete())
        store.insert_frame(connection, segment_members, members)


def read_members(store: PersonaStore, device_ids: list[str]) -> pd.DataFrame:
    """The segment and distance the last fit gave those of `device_ids` it segmented (device_id
    index; columns cluster_id, distance, space)."""
    m = segment_members.c
    frame = store.read_frame_in(
        sa.select(m.device_id, m.cluster_id, m.distance, m.space), m.device_id, device_ids
    )
    return frame.set_index("device_id")


def _not_current(
    columns: list[sa.ColumnElement], shard: DeviceShard | None, space: str, fitted_at: pd.Timestamp
) -> sa.Select:
    """`columns` of the devices of `shard` (every device when None) whose segment is not current:
    never assigned, assigned before their vector changed, by another fit than that of
    `fitted_at`, or in another space. A join on primary keys."""
    v, c = persona_vectors.c, device_clusters.c
    query = (
        sa.select(*columns)
        .select_from(persona_vectors.outerjoin(device_clusters, v.device_id == c.device_id))
        .where(
            sa.or_(
                c.device_id.is_(None),
                v.computed_at > c.clustered_at,
                c.fitted_at.is_distinct_from(fitted_at.to_pydatetime()),
                c.space != space,
            )
        )
    )
    return query if shard is None else query.where(shard.holds_hash(v.device_hash))


def read_to_assign(
    store: PersonaStore, shard: DeviceShard | None, space: str, fitted_at: pd.Timestamp, rows: int
) -> Iterator[pd.DataFrame]:
    """The devices of `shard` whose segment is not current (see `_not_current`), `rows` at a time
    in device_id order (device_id, vector, computed_at): the day after a fit every device, on the
    days between the devices whose vector changed."""
    v = persona_vectors.c
    query = _not_current([v.device_id, v.vector, v.computed_at], shard, space, fitted_at)
    for page in store.read_pages(query, v.device_id, rows):
        page["computed_at"] = as_utc(page["computed_at"])
        yield page


def count_not_current(
    store: PersonaStore, shard: DeviceShard | None, space: str, fitted_at: pd.Timestamp
) -> int:
    """How many devices of `shard` have a vector but no current segment (see `_not_current`)."""
    return int(store.scalar(_not_current([sa.func.count()], shard, space, fitted_at)) or 0)


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
    """The last fit of `space` with its centres (none when it found no segment), or None."""
    f, c = segment_fits.c, segment_centres.c
    fit = store.read_frame(sa.select(f.fitted_at, f.settings).where(f.space == space))
    if fit.empty:
        return None
    frame = store.read_frame(sa.select(c.cluster_id, c.centre).where(c.space == space).order_by(c.cluster_id))
    centres = np.frombuffer(b"".join(frame["centre"].tolist()), dtype="<f8").reshape(len(frame), dimensions)
    return StoredFit(
        cluster_ids=frame["cluster_id"].to_numpy(dtype=np.int64),
        centres=centres,
        fitted_at=as_utc(fit["fitted_at"]).iloc[0],
        settings=str(fit["settings"].iloc[0]),
    )


def read_fitted_at(store: PersonaStore, space: str) -> pd.Timestamp | None:
    """When the segments of `space` were last fitted (None: never)."""
    f = segment_fits.c
    fitted_at = store.scalar(sa.select(f.fitted_at).where(f.space == space))
    return None if fitted_at is None else as_utc(pd.Series([fitted_at])).iloc[0]


def read_last_fit_space(store: PersonaStore) -> str | None:
    """The feature space of the newest full fit, if any."""
    f = segment_fits.c
    frame = store.read_frame(sa.select(f.space).order_by(f.fitted_at.desc()).limit(1))
    return None if frame.empty else str(frame["space"].iloc[0])


def read_member_segments(store: PersonaStore, device_ids: list[str] | None = None) -> pd.Series:
    """The segment the last fit gave each device it segmented (device_id index)."""
    m = segment_members.c
    query = sa.select(m.device_id, m.cluster_id)
    frame = (
        store.read_frame(query) if device_ids is None else store.read_frame_in(query, m.device_id, device_ids)
    )
    return frame.set_index("device_id")["cluster_id"].astype("int64")


def count_changed_since_fit(store: PersonaStore, fitted_at: pd.Timestamp) -> int:
    """Devices whose vector changed after the fit of `fitted_at` and has no segment since: what a
    refit's `refit_changed_share` weighs. A vector the fit read is not counted, so a fit run again
    before device_clusters assigned its devices does not fit anew for that."""
    v, c = persona_vectors.c, device_clusters.c
    query = (
        sa.select(sa.func.count())
        .select_from(persona_vectors.outerjoin(device_clusters, v.device_id == c.device_id))
        .where(
            v.computed_at > fitted_at.to_pydatetime(),
            sa.or_(c.device_id.is_(None), v.computed_at > c.clustered_at),
        )
    )
    return int(store.scalar(query) or 0)


def read_gone(store: PersonaStore, shard: DeviceShard | None) -> list[str]:
    """The devices of `shard` (every device when None) with a segment but no vector any more."""
    gone = devices_without_a_vector(store, device_clusters)
    if shard is None or not gone:
        return gone
    held = shard.holds(pd.Series(gone, dtype=object))
    return np.asarray(gone, dtype=object)[held].tolist()


def write_assigned(store: PersonaStore, assigned: pd.DataFrame, gone: list[str]) -> None:
    """Replace the rows of the assigned and the gone devices in one transaction."""
    ids = [*assigned["device_id"].tolist(), *gone]
    with store.begin() as connection:
        store.delete_in(connection, device_clusters, device_clusters.c.device_id, ids)
        store.insert_frame(connection, device_clusters, assigned)


def segment_sizes(store: PersonaStore) -> pd.Series:
    """Devices per cluster_id today (cluster_id index, NOISE included), counted in the database."""
    c = device_clusters.c
    frame = store.read_frame(
        sa.select(c.cluster_id, sa.func.count().label("devices"))
        .group_by(c.cluster_id)
        .order_by(c.cluster_id)
    )
    return frame.set_index("cluster_id")["devices"].astype("int64")


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
