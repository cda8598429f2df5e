"""Reads and writes of the feedback domain in the persona store."""

from __future__ import annotations

import json

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.offers.storage import answered_offers
from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import (
    key_weight_refreshes,
    offer_feedback,
    offer_feedback_rejects,
    service_recommendations,
)


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


def read_responded_offers(store: PersonaStore) -> pd.DataFrame:
    """Offers with at least one response: offer_id, service_id, trigger, space, persona_vector,
    weights_version, accepted (any response accepted or used)."""
    r = service_recommendations.c
    answered = answered_offers()
    frame = store.read_frame(
        sa.select(
            r.offer_id,
            r.service_id,
            r.trigger,
            r.space,
            r.persona_vector,
            r.weights_version,
            answered.c.accepted,
        )
        .join(answered, answered.c.offer_id == r.offer_id)
        .order_by(r.offer_id)
    )
    return frame.assign(accepted=frame["accepted"].astype(bool))


def read_feedback_batch_ids(store: PersonaStore) -> set[str]:
    """Every batch that has delivered responses."""
    return set(store.read_frame(sa.select(offer_feedback.c.batch_id).distinct())["batch_id"])


def read_learned_batches(store: PersonaStore) -> set[str]:
    frame = store.read_frame(sa.select(key_weight_refreshes.c.batches))
    return {batch for text in frame["batches"] for batch in json.loads(text)}


def record_refresh(store: PersonaStore, version: int, batches: list[str], responses: int) -> None:
    with store.begin() as connection:
        connection.execute(
            key_weight_refreshes.insert().values(
                version=version,
                batches=json.dumps(sorted(batches)),
                responses=responses,
                created_at=pd.Timestamp.now(tz="UTC").to_pydatetime(),
            )
        )


def acceptance_by_weights_version(store: PersonaStore) -> pd.DataFrame:
    """Per weights version behind the offers: offers made, answered, accepted, acceptance rate."""
    r = service_recommendations.c
    answered = answered_offers()
    frame = store.read_frame(
        sa.select(
            r.weights_version,
            sa.func.count().label("offers"),
            sa.func.count(answered.c.offer_id).label("answered"),
            sa.func.coalesce(sa.func.sum(answered.c.accepted), 0).label("accepted"),
        )
        .outerjoin(answered, answered.c.offer_id == r.offer_id)
        .group_by(r.weights_version)
        .order_by(r.weights_version)
    )
    frame["acceptance_rate"] = (frame["accepted"] / frame["answered"].where(frame["answered"] > 0)).round(4)
    return frame
