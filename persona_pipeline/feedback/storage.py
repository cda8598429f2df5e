"""Reads and writes of the feedback domain in the persona store."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.offers.storage import answered_offers
from persona_pipeline.personas.weights import insert_weights
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
    """Replace the batch's responses and rejects (re-processing a batch changes nothing), under a
    new load id: the next weights refresh learns from them again."""
    with store.begin() as connection:
        for table in (offer_feedback, offer_feedback_rejects):
            connection.execute(table.delete().where(table.c.batch_id == batch_id))
        store.insert_frame(connection, offer_feedback, responses.assign(load_id=uuid.uuid4().hex))
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


@dataclass(frozen=True)
class UnlearnedFeedback:
    """The feedback a weights refresh has not learned from: batches, and the writes of their rows."""

    batches: list[str]
    loads: list[str]


def read_unlearned_feedback(store: PersonaStore) -> UnlearnedFeedback:
    """Batches whose rows were written since a refresh last learned from them: a new batch, a batch
    re-processed, or held rows that became responses of their batch later. Rows written before
    load ids existed (revision 0005) count as learned when their batch was."""
    f = offer_feedback.c
    loaded = store.read_frame(sa.select(f.batch_id, f.load_id).distinct())
    refreshes = store.read_frame(sa.select(key_weight_refreshes.c.batches, key_weight_refreshes.c.loads))
    learned_batches = {batch for text in refreshes["batches"] for batch in json.loads(text)}
    learned_loads = {load for text in refreshes["loads"].dropna() for load in json.loads(text)}
    without_load = loaded["load_id"].isna()
    new = loaded[
        (without_load & ~loaded["batch_id"].isin(learned_batches))
        | (~without_load & ~loaded["load_id"].isin(learned_loads))
    ]
    return UnlearnedFeedback(
        batches=sorted(new["batch_id"].unique()), loads=sorted(new["load_id"].dropna().unique())
    )


def record_refresh(
    store: PersonaStore,
    version: int,
    new_weights: dict[str, float] | None,
    learned: UnlearnedFeedback,
    responses: int,
) -> None:
    """Record a refresh that leaves `version` in use, with the weights of that version when the
    refresh made it, in one transaction: a retry after a failure learns the same feedback once."""
    with store.begin() as connection:
        if new_weights is not None:
            insert_weights(store, version, new_weights, "feedback", connection=connection)
        connection.execute(
            key_weight_refreshes.insert().values(
                version=version,
                batches=json.dumps(learned.batches),
                loads=json.dumps(learned.loads),
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
