"""Reads of the ingest domain's data: the update history and the rejects table (the index_updates
asset writes both)."""

from __future__ import annotations

import sqlalchemy as sa

from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import index_update_rejects


def count_accepted(store: PersonaStore, days: list[str]) -> int:
    """Accepted updates of `days` in the update history."""
    return int(store.history.count_by_day(days).sum())


def rejects_by_reason(store: PersonaStore, days: list[str]) -> list[tuple[str, int]]:
    """(reason_code, rows) of the days' rejects, the most frequent first."""
    r = index_update_rejects.c
    query = (
        sa.select(r.reason_code, sa.func.count())
        .where(r.partition_date.in_(days))
        .group_by(r.reason_code)
        .order_by(sa.func.count().desc())
    )
    with store.engine.connect() as connection:
        return [(code, int(count)) for code, count in connection.execute(query).all()]


def rejects_replaced(days: list[str], shard: DeviceShard | None) -> sa.ColumnElement[bool]:
    """The rejects a run of `days` on `shard` replaces: every reject of the days unsharded; on a
    shard its own, and those written under another shard count or before shards were recorded
    (the days are being ingested again shard by shard)."""
    r = index_update_rejects.c
    of_days = r.partition_date.in_(days)
    if shard is None:
        return of_days
    return of_days & (
        r.device_shards.is_(None) | (r.device_shards != shard.count) | (r.device_shard == shard.index)
    )


def count_day_rejects(store: PersonaStore, days: list[str], shards: int) -> int:
    """The rejects of `days` written by runs of a shard count of `shards`: the days' rejects over
    the shards that have run."""
    r = index_update_rejects.c
    query = sa.select(sa.func.count()).where(r.partition_date.in_(days), r.device_shards == shards)
    with store.engine.connect() as connection:
        return int(connection.execute(query).scalar_one())
