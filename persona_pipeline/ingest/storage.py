"""Reads of the ingest domain's tables in the persona store (the index_updates asset writes them)."""

from __future__ import annotations

import sqlalchemy as sa

from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import index_update_rejects, index_updates


def count_accepted(store: PersonaStore, days: list[str]) -> int:
    with store.engine.connect() as connection:
        query = sa.select(sa.func.count()).where(index_updates.c.partition_date.in_(days))
        return int(connection.execute(query).scalar() or 0)


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
