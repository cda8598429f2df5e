"""Reads and writes of the personas domain in the persona store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import sqlalchemy as sa

from persona_pipeline.device_shards import DeviceShard, device_hash
from persona_pipeline.resources.persona_store import PersonaStore, as_utc
from persona_pipeline.store.tables import (
    device_profiles,
    erasure_requests,
    persona_dimensions,
    persona_vector_runs,
    persona_vectors,
    profile_changes,
    vector_index_state,
)


def read_updates_for_days(
    store: PersonaStore, days: list[str], shard: DeviceShard | None = None
) -> pd.DataFrame:
    """The accepted updates of `days`, from the update history: every device's, or one shard's."""
    return store.history.read(
        days,
        ["device_id", "customer_id", "key", "value", "value_number", "observed_at"],
        shard=None if shard is None else shard.index,
    )


def count_updates_by_day(store: PersonaStore, days: list[str]) -> pd.DataFrame:
    """Accepted updates per day of `days` (index: day; column updates_read), zeros included."""
    return store.history.count_by_day(days).to_frame("updates_read")


def merge_into_profiles(store: PersonaStore, latest: pd.DataFrame) -> None:
    """Upsert where the incoming (observed_at, value, customer_id) is at least the stored one.

    An equal triple overwrites too: it is the same update, re-ingested, and carries
    the current reading of the value (value_number after a schema change).
    """

    def newer(stored, incoming):
        stored_customer = sa.func.coalesce(stored.customer_id, "")
        incoming_customer = sa.func.coalesce(incoming.customer_id, "")
        same_time = incoming.observed_at == stored.observed_at
        return (
            (incoming.observed_at > stored.observed_at)
            | (same_time & (incoming.value > stored.value))
            | (same_time & (incoming.value == stored.value) & (incoming_customer >= stored_customer))
        )

    devices = pd.DataFrame({"device_id": latest["device_id"].unique()})
    devices["device_hash"] = device_hash(devices["device_id"])
    profiles = latest.assign(device_hash=device_hash(latest["device_id"]))
    with store.begin() as connection:
        store.upsert_newer(device_profiles, profiles, ["device_id", "key"], newer, connection)
        store.insert_frame(connection, profile_changes, devices)


def _of_shard(query: sa.Select, table: sa.Table, shard: DeviceShard | None) -> sa.Select:
    """`query` limited to the rows of `shard`'s devices (every row when None)."""
    return query if shard is None else query.where(shard.holds_hash(table.c.device_hash))


@dataclass
class ProfileChanges:
    """The profile_changes rows read: their ids (to delete once handled) and devices."""

    change_ids: list[int]
    devices: list[str]


def read_profile_changes(store: PersonaStore, shard: DeviceShard | None = None) -> ProfileChanges:
    """The changes not handled yet, of `shard`'s devices or every device's."""
    c = profile_changes.c
    query = sa.select(c.change_id, c.device_id).where(c.device_id.is_not(None))
    frame = store.read_frame(_of_shard(query, profile_changes, shard))
    return ProfileChanges(
        change_ids=frame["change_id"].astype("int64").tolist(),
        devices=sorted(frame["device_id"].unique().tolist()),
    )


def clear_profile_changes(store: PersonaStore, changes: ProfileChanges) -> None:
    """Delete the rows read (rows added since stay for the next run)."""
    ids = changes.change_ids
    with store.begin() as connection:
        store.delete_in(connection, profile_changes, profile_changes.c.change_id, ids)


def read_profiles_of(
    store: PersonaStore, device_ids: list[str], columns: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """The profile rows of `device_ids` (only `columns`, when given)."""
    selected = device_profiles.c if columns is None else [device_profiles.c[c] for c in columns]
    query = sa.select(*selected)
    frame = store.read_frame_in(query, device_profiles.c.device_id, device_ids)
    if "observed_at" in frame.columns:
        frame["observed_at"] = as_utc(frame["observed_at"])
    return frame


def read_profiles(
    store: PersonaStore,
    key_prefix: str | None = None,
    columns: tuple[str, ...] | None = None,
    shard: DeviceShard | None = None,
) -> pd.DataFrame:
    """Every profile row (only `columns`, when given; of `shard`'s devices, when given), or
    those whose key starts with `key_prefix`, and maybe a few more (LIKE reads `_` as any
    character, and SQLite ignores case): the caller selects exactly."""
    query = sa.select(*[device_profiles.c[c] for c in columns]) if columns else sa.select(device_profiles)
    query = _of_shard(query, device_profiles, shard)
    if key_prefix is not None:
        query = query.where(device_profiles.c.key.like(key_prefix + "%"))
    frame = store.read_frame(query)
    if "observed_at" in frame.columns:
        frame["observed_at"] = as_utc(frame["observed_at"])
    return frame


def read_profile_pages(store: PersonaStore, shard: DeviceShard | None, rows: int) -> Iterator[pd.DataFrame]:
    """Every profile row of `shard`'s devices (every device's when None), in device order, about
    `rows` rows at a time: a page ends where a device ends, so each device's rows are in one
    page (a device with `rows` rows or more is a page of its own)."""
    p = device_profiles.c
    query = _of_shard(sa.select(device_profiles), device_profiles, shard).order_by(p.device_id, p.key)
    after = None
    while True:
        page = store.read_frame((query if after is None else query.where(p.device_id > after)).limit(rows))
        if len(page) == rows:
            last = page["device_id"].iloc[-1]
            page = page[page["device_id"] != last]
            if page.empty:
                page = store.read_frame(query.where(p.device_id == last))
        if page.empty:
            return
        page = page.reset_index(drop=True)
        page["observed_at"] = as_utc(page["observed_at"])
        # A page of text values alone would read its NULL numbers as objects.
        page["value_number"] = page["value_number"].astype("float64")
        yield page
        after = page["device_id"].iloc[-1]


def read_latest_observed_at(store: PersonaStore) -> pd.Timestamp | None:
    """The event time of the newest profile value (None when there are no profiles)."""
    latest = store.scalar(sa.select(sa.func.max(device_profiles.c.observed_at)))
    return None if latest is None else as_utc(pd.Series([latest])).iloc[0]


def profile_counts(store: PersonaStore) -> tuple[int, int]:
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(sa.func.count()).select_from(device_profiles)).scalar()
        devices = connection.execute(
            sa.select(sa.func.count(sa.distinct(device_profiles.c.device_id)))
        ).scalar()
    return int(rows or 0), int(devices or 0)


def count_vectors(store: PersonaStore, shard: DeviceShard | None = None) -> int:
    """Devices with a vector, of `shard` or of the fleet."""
    query = _of_shard(sa.select(sa.func.count()).select_from(persona_vectors), persona_vectors, shard)
    return int(store.scalar(query) or 0)


def read_key_history(
    store: PersonaStore, key: str, since: pd.Timestamp, shard: DeviceShard | None = None
) -> pd.DataFrame:
    """Updates of `key` after `since`, plus the last update at or before it of each device that
    has one after (the value it changed from; other devices' history says nothing of a change);
    of `shard`'s devices, when given. Every history file is read, whatever shard count wrote it."""
    rows = store.history.read_table(None, ["device_id", "value", "observed_at"], ds.field("key") == key)
    if shard is not None:
        rows = rows.filter(pa.array(shard.holds(rows.column("device_id").to_pandas())))
    start = pd.Timestamp(since)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    is_after = pc.greater(
        rows.column("observed_at"), pa.scalar(start, type=rows.schema.field("observed_at").type)
    )
    after = rows.filter(is_after)
    of_devices_after = pc.is_in(rows.column("device_id"), value_set=pc.unique(after.column("device_id")))
    earlier = rows.filter(pc.and_(pc.invert(is_after), of_devices_after)).to_pandas()
    before = earlier[earlier["observed_at"] == earlier.groupby("device_id")["observed_at"].transform("max")]
    frame = pd.concat([after.to_pandas(), before], ignore_index=True)
    return frame.drop_duplicates().reset_index(drop=True)


def encode_vectors(matrix: np.ndarray) -> list[bytes]:
    """Each row as little-endian float32 bytes (one numpy call, no per-device Python)."""
    contiguous = np.ascontiguousarray(matrix, dtype="<f4")
    return contiguous.view(np.dtype((np.void, contiguous.shape[1] * 4))).ravel().tolist()


def decode_vectors(blobs: pd.Series, dimensions: int) -> np.ndarray:
    if blobs.empty:
        return np.zeros((0, dimensions), dtype=np.float32)
    return np.frombuffer(b"".join(blobs.tolist()), dtype="<f4").reshape(len(blobs), dimensions)


def read_vector_fingerprints(
    store: PersonaStore, device_ids: list[str] | None = None, shard: DeviceShard | None = None
) -> pd.Series:
    """Fingerprint per device with a vector (of `device_ids` only, or of `shard`'s, when given)."""
    v = persona_vectors.c
    query = sa.select(v.device_id, v.fingerprint)
    if device_ids is None:
        frame = store.read_frame(_of_shard(query, persona_vectors, shard))
    else:
        frame = store.read_frame_in(query, v.device_id, device_ids)
    return frame.set_index("device_id")["fingerprint"]


@dataclass
class VectorRun:
    """The last persona_vectors run of a device shard: its feature space, the newest event time
    it computed at, and how many of the shard's devices had a vector after it."""

    space: str
    as_of: pd.Timestamp
    devices: int


def _shard_numbers(shard: DeviceShard | None) -> tuple[int, int]:
    """(device_shard, device_shards) of a vector run: 0 of 1 for the unsharded run."""
    return (0, 1) if shard is None else (shard.index, shard.count)


def read_last_vector_run(store: PersonaStore, shard: DeviceShard | None = None) -> VectorRun | None:
    """The newest run of `shard` (the unsharded run when None) in any feature space."""
    r = persona_vector_runs.c
    index, count = _shard_numbers(shard)
    query = (
        sa.select(r.space, r.as_of, r.devices)
        .where(r.device_shard == index, r.device_shards == count)
        .order_by(r.computed_at.desc())
        .limit(1)
    )
    frame = store.read_frame(query)
    if frame.empty:
        return None
    row = frame.iloc[0]
    return VectorRun(row["space"], as_utc(frame["as_of"]).iloc[0], int(row["devices"]))


# Erasure requests on record: a vectors run compares the count at its start and at its record.
# Completed erasures: a request records its row before it completes (what cannot be rolled back
# is counted as soon as it is gone) and sets completed_at in the transaction that deletes its rows.
_ERASURES = (
    sa.select(sa.func.count())
    .select_from(erasure_requests)
    .where(erasure_requests.c.completed_at.is_not(None))
)


def count_erasures(store: PersonaStore) -> int:
    return int(store.scalar(_ERASURES) or 0)


def record_vector_run(
    store: PersonaStore, run: VectorRun, shard: DeviceShard | None, erasures_at_start: int
) -> bool:
    """Record the shard's run, replacing its earlier one and any run of another shard count
    (a count used again must not find a stale run). Not when an erasure completed since the
    run began (`erasures_at_start` differs): it may have written an erased device's vector back,
    and without a run on record the next one computes every device of the shard and drops it.
    The erasure holds the same table, so one of the two sees the other. Whether it recorded."""
    index, count = _shard_numbers(shard)
    row = pd.DataFrame(
        {
            "space": [run.space],
            "device_shard": [index],
            "device_shards": [count],
            "as_of": [run.as_of],
            "computed_at": [pd.Timestamp.now(tz="UTC")],
            "devices": [run.devices],
        }
    )
    r = persona_vector_runs.c
    with store.begin() as connection:
        store.hold_other_writers(connection, persona_vector_runs)
        this_shard = sa.and_(r.space == run.space, r.device_shard == index, r.device_shards == count)
        connection.execute(persona_vector_runs.delete().where(this_shard | (r.device_shards != count)))
        erasures = connection.execute(_ERASURES).scalar()
        if int(erasures or 0) != erasures_at_start:
            return False
        store.insert_frame(connection, persona_vector_runs, row)
    return True


def _delete_devices(
    connection: sa.Connection,
    table: sa.Table,
    device_ids: list[str],
    where: sa.ColumnElement[bool] | None = None,
) -> None:
    """Delete the rows of `device_ids` (in chunks that fit any backend's parameter limit)."""
    PersonaStore.delete_in(connection, table, table.c.device_id, device_ids, where)


def write_vectors(store: PersonaStore, rows: pd.DataFrame, removed: list[str]) -> None:
    """Replace the rows of changed devices and delete the rows of devices that are gone."""
    with store.begin() as connection:
        _delete_devices(connection, persona_vectors, [*rows["device_id"].tolist(), *removed])
        store.insert_frame(connection, persona_vectors, rows)


def write_dimensions(store: PersonaStore, space: str, frame: pd.DataFrame) -> None:
    """The dimensions of `space` (a feature space fixes them): an upsert, as every device shard's
    run writes the same rows, maybe at once."""
    store.upsert_newer(persona_dimensions, frame.assign(space=space), ["space", "position"])


def read_dimension_count(store: PersonaStore, space: str) -> int:
    query = (
        sa.select(sa.func.count()).select_from(persona_dimensions).where(persona_dimensions.c.space == space)
    )
    return int(store.scalar(query) or 0)


def read_vector_summaries(store: PersonaStore, device_ids: list[str] | None = None) -> pd.DataFrame:
    """Every device's vector row without the vector itself (of `device_ids` only, when given)."""
    v = persona_vectors.c
    query = sa.select(v.device_id, v.customer_id, v.space, v.weights_version, v.fingerprint)
    if device_ids is None:
        return store.read_frame(query)
    return store.read_frame_in(query, v.device_id, device_ids)


def read_vector_blobs(store: PersonaStore, device_ids: list[str]) -> pd.Series:
    """The encoded vectors of `device_ids`, in that order."""
    v = persona_vectors.c
    frame = store.read_frame_in(sa.select(v.device_id, v.vector), v.device_id, device_ids)
    return frame.set_index("device_id")["vector"].reindex(device_ids)


def read_vector_pages(store: PersonaStore, rows: int) -> Iterator[pd.DataFrame]:
    """Every device's vector (device_id, vector), `rows` at a time in device_id order."""
    v = persona_vectors.c
    yield from store.read_pages(sa.select(v.device_id, v.vector), v.device_id, rows)


def devices_without_a_vector(store: PersonaStore, table: sa.Table) -> list[str]:
    """The devices `table` holds a row of that have no vector any more (a join on primary keys)."""
    v, t = persona_vectors.c, table.c
    query = (
        sa.select(t.device_id)
        .select_from(table.outerjoin(persona_vectors, v.device_id == t.device_id))
        .where(v.device_id.is_(None))
    )
    return store.read_frame(query)["device_id"].tolist()


def read_vector_ids(store: PersonaStore) -> np.ndarray:
    """The devices with a vector, in device_id order."""
    v = persona_vectors.c
    return store.read_frame(sa.select(v.device_id).order_by(v.device_id))["device_id"].to_numpy(dtype=object)


def several_spaces(spaces: list[str]) -> str:
    return (
        f"persona_vectors holds several feature spaces {spaces}: re-run persona_vectors (with device "
        "shards, the shards not rebuilt since the newest key weights)"
    )


def read_vector_spaces(store: PersonaStore) -> list[str]:
    """The feature spaces persona_vectors holds (one, normally)."""
    return sorted(store.read_frame(sa.select(persona_vectors.c.space).distinct())["space"].tolist())


def read_vector_overview(store: PersonaStore) -> tuple[int, int | None]:
    """How many devices have a vector, and the weights version of one of them."""
    v = persona_vectors.c
    devices = int(store.scalar(sa.select(sa.func.count()).select_from(persona_vectors)) or 0)
    version = store.scalar(sa.select(v.weights_version).limit(1))
    return devices, None if version is None else int(version)


def read_unindexed_vectors(store: PersonaStore, collection: str | None, rows: int) -> Iterator[pd.DataFrame]:
    """What `collection` lacks, `rows` devices at a time in device_id order: the vector
    summaries of devices it does not hold at their current fingerprint (every device's when
    `collection` is None: a new or rebuilt collection). A join on primary keys in the database,
    so a day's index write reads what changed, not the fleet."""
    v, s = persona_vectors.c, vector_index_state.c
    query = sa.select(v.device_id, v.customer_id, v.space, v.weights_version, v.fingerprint)
    if collection is not None:
        held = sa.and_(s.device_id == v.device_id, s.collection == collection)
        query = query.select_from(persona_vectors.outerjoin(vector_index_state, held)).where(
            sa.or_(s.device_id.is_(None), s.fingerprint != v.fingerprint)
        )
    yield from store.read_pages(query, v.device_id, rows)


def read_indexed_without_vector(store: PersonaStore, collection: str) -> list[str]:
    """The devices `collection` holds that have no vector any more."""
    v, s = persona_vectors.c, vector_index_state.c
    held = sa.and_(s.device_id == v.device_id, s.collection == collection)
    gone = store.read_frame(
        sa.select(s.device_id)
        .select_from(vector_index_state.outerjoin(persona_vectors, held))
        .where(s.collection == collection, v.device_id.is_(None))
        .order_by(s.device_id)
    )
    return gone["device_id"].tolist()


def write_index_state(
    store: PersonaStore, collection: str, written: pd.DataFrame, deleted: list[str], whole: bool = False
) -> None:
    """Record the fingerprint of the points written to `collection` (`written`: device_id,
    fingerprint) and this write's mark, and forget the deleted ones. `whole`: the collection was
    written whole, so its earlier state goes in one statement."""
    state = vector_index_state
    written = written.assign(written=time.time_ns() // 1000)  # microseconds: exact as a float too
    with store.begin() as connection:
        if whole:
            connection.execute(state.delete().where(state.c.collection == collection))
        else:
            ids = [*written["device_id"].tolist(), *deleted]
            _delete_devices(connection, state, ids, state.c.collection == collection)
        store.insert_frame(connection, state, written.assign(collection=collection))


def forget_collections(store: PersonaStore, collections: list[str]) -> None:
    """Forget the index state of dropped collections (device_clusters forgets their payloads)."""
    if collections:
        with store.begin() as connection:
            state = vector_index_state
            connection.execute(state.delete().where(state.c.collection.in_(collections)))


@dataclass
class StoredVectors:
    """Every device's persona vector, rows ordered by device_id."""

    device_ids: np.ndarray
    customer_ids: np.ndarray
    matrix: np.ndarray
    space: str | None
    dimension_names: list[str]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            self.matrix, index=pd.Index(self.device_ids, name="device_id"), columns=self.dimension_names
        )


def read_stored_vectors(store: PersonaStore, sample_size: int | None = None) -> StoredVectors:
    """Every device's vector; with `sample_size`, those of the `sample_size` devices with the
    lowest `device_hash`: a uniform sample, the same in every process and on every backend."""
    v = persona_vectors.c
    query = sa.select(v.device_id, v.customer_id, v.space, v.vector).order_by(v.device_id)
    if sample_size is not None:
        sampled = sa.select(v.device_id).order_by(v.device_hash, v.device_id).limit(sample_size)
        query = query.where(v.device_id.in_(sampled))
    frame = store.read_frame(query)
    spaces = sorted(frame["space"].unique().tolist())
    if len(spaces) > 1:
        raise ValueError(several_spaces(spaces))
    space = spaces[0] if spaces else None
    names = read_dimension_names(store, space) if space else []
    return StoredVectors(
        device_ids=frame["device_id"].to_numpy(dtype=object),
        customer_ids=frame["customer_id"].to_numpy(dtype=object),
        matrix=decode_vectors(frame["vector"], len(names)),
        space=space,
        dimension_names=names,
    )


def read_dimensions(store: PersonaStore, space: str) -> pd.DataFrame:
    """The dimensions of a stored feature space, in position order: name, weight."""
    d = persona_dimensions.c
    return store.read_frame(sa.select(d.name, d.weight).where(d.space == space).order_by(d.position))


def read_dimension_names(store: PersonaStore, space: str) -> list[str]:
    return read_dimensions(store, space)["name"].tolist()


def read_vector_sample(store: PersonaStore, size: int, seed: int | None = None) -> pd.DataFrame:
    """`size` consecutive devices (device_id, vector) from a random place in persona_vectors,
    read along its primary key: what persona_index reads back from Qdrant to verify it."""
    v = persona_vectors.c
    devices = int(store.scalar(sa.select(sa.func.count()).select_from(persona_vectors)) or 0)
    start = int(np.random.default_rng(seed).integers(0, max(devices - size, 0) + 1))
    return store.read_frame(sa.select(v.device_id, v.vector).order_by(v.device_id).offset(start).limit(size))


def count_index_state(store: PersonaStore, collection: str) -> int:
    """How many devices vector_index_state records as written to `collection`."""
    s = vector_index_state.c
    return int(store.scalar(sa.select(sa.func.count()).where(s.collection == collection)) or 0)
