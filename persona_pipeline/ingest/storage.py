"""Reads of the ingest domain's data: the update history and the rejects table (the index_updates
asset writes both)."""

from __future__ import annotations

import sqlalchemy as sa

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
