"""Reads and writes of the feedback domain in the persona store."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import offer_feedback, offer_feedback_rejects, service_recommendations


def known_offer_ids(store: PersonaStore, offer_ids: list[str]) -> pd.Index:
    """Those of `offer_ids` that name an offer that was made."""
    found: list[str] = []
    with store.engine.connect() as connection:
        for start in range(0, len(offer_ids), 10_000):
            chunk = offer_ids[start : start + 10_000]
            column = service_recommendations.c.offer_id
            found += connection.execute(sa.select(column).where(column.in_(chunk))).scalars().all()
    return pd.Index(found)


def write_batch(store: PersonaStore, batch_id: str, responses: pd.DataFrame, rejects: pd.DataFrame) -> None:
    """Replace the batch's responses and rejects (re-processing a batch changes nothing)."""
    with store.begin() as connection:
        for table in (offer_feedback, offer_feedback_rejects):
            connection.execute(table.delete().where(table.c.batch_id == batch_id))
        store.insert_frame(connection, offer_feedback, responses)
        store.insert_frame(connection, offer_feedback_rejects, rejects)
