"""Reads and writes of the feedback domain in the persona store."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

from persona_pipeline.offers.storage import answered_offers
from persona_pipeline.personas.weights import ACCEPTED, REJECTED, insert_weights
from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import (
    key_weight_refreshes,
    offer_feedback,
    offer_feedback_held,
    offer_feedback_rejects,
    service_recommendations,
)


def read_offer_times(store: PersonaStore, offer_ids: list[str]) -> pd.DataFrame:
    """The offers among `offer_ids` that were made: index offer_id; created_at, offer_day."""
    r = service_recommendations.c
    frame = store.read_frame_in(sa.select(r.offer_id, r.created_at, r.offer_day), r.offer_id, offer_ids)
    return frame.set_index("offer_id")


def read_held(store: PersonaStore) -> pd.DataFrame:
    """Every held row (responses to offers not made yet), of every batch."""
    return store.read_frame(sa.select(offer_feedback_held))


def read_held_batches(store: PersonaStore) -> pd.DataFrame:
    """The batches with held rows: batch_id, hold_until (the earliest of the batch's rows)."""
    h = offer_feedback_held.c
    return store.read_frame(
        sa.select(h.batch_id, sa.func.min(h.hold_until).label("hold_until")).group_by(h.batch_id)
    ).assign(hold_until=lambda frame: pd.to_datetime(frame["hold_until"], utc=True))


def read_unknown_offer_rejects(store: PersonaStore, batch_id: str) -> pd.DataFrame:
    """The batch's rows rejected for naming no offer: batch_id, source_file, source_row, rejected_at."""
    j = offer_feedback_rejects.c
    return store.read_frame(
        sa.select(j.batch_id, j.source_file, j.source_row, j.rejected_at).where(
            (j.batch_id == batch_id) & (j.reason_code == "unknown_offer")
        )
    )


def write_batch(
    store: PersonaStore,
    batch_id: str,
    responses: pd.DataFrame,
    rejects: pd.DataFrame,
    held: pd.DataFrame,
    retried_batches: list[str],
) -> None:
    """In one transaction: replace the batch's responses, rejects and held rows (re-processing a
    batch changes nothing); for `retried_batches`, the other batches whose held rows were tried
    again, add the responses and rejects they became and replace their held rows. Responses go in
    under a new load id, so the next weights refresh learns from their batches again."""
    load_id = uuid.uuid4().hex
    others = responses["batch_id"] != batch_id
    with store.begin() as connection:
        for table in (offer_feedback, offer_feedback_rejects, offer_feedback_held):
            connection.execute(table.delete().where(table.c.batch_id == batch_id))
        store.delete_in(connection, offer_feedback_held, offer_feedback_held.c.batch_id, retried_batches)
        for other, promoted in responses[others].groupby("batch_id"):
            store.delete_in(
                connection,
                offer_feedback,
                offer_feedback.c.offer_id,
                promoted["offer_id"].unique().tolist(),
                where=offer_feedback.c.batch_id == other,
            )
        store.insert_frame(connection, offer_feedback, responses.assign(load_id=load_id))
        store.insert_frame(connection, offer_feedback_rejects, rejects)
        store.insert_frame(connection, offer_feedback_held, held)


def read_responded_offers(store: PersonaStore) -> pd.DataFrame:
    """Offers with at least one response: offer_id, device_id, service_id, trigger, space,
    persona_vector, weights_version, accepted (the latest answer accepted or used)."""
    r = service_recommendations.c
    answered = answered_offers()
    frame = store.read_frame(
        sa.select(
            r.offer_id,
            r.device_id,
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


@dataclass(frozen=True)
class Candidate:
    """A candidate weights version a refresh made, and the gate's decision on it."""

    version: int
    weights: dict[str, float]
    accepted: bool
    reason: str
    evidence: dict


def record_refresh(
    store: PersonaStore,
    live_version: int,
    candidate: Candidate | None,
    learned: UnlearnedFeedback,
    responses: int,
) -> int:
    """Record a refresh, with its candidate version (accepted or rejected) when it made one, in one
    transaction: a retry after a failure learns the same feedback once. Returns the version live
    after it."""
    in_use = candidate.version if candidate is not None and candidate.accepted else live_version
    with store.begin() as connection:
        if candidate is not None:
            status = ACCEPTED if candidate.accepted else REJECTED
            insert_weights(
                store, candidate.version, candidate.weights, "feedback", connection=connection, status=status
            )
        connection.execute(
            key_weight_refreshes.insert().values(
                version=in_use,
                batches=json.dumps(learned.batches),
                loads=json.dumps(learned.loads),
                responses=responses,
                created_at=pd.Timestamp.now(tz="UTC").to_pydatetime(),
                candidate_version=candidate.version if candidate is not None else None,
                decision=(ACCEPTED if candidate.accepted else REJECTED) if candidate is not None else None,
                reason=candidate.reason if candidate is not None else None,
                evidence=json.dumps(candidate.evidence, default=_json_number)
                if candidate is not None
                else None,
            )
        )
    return in_use


def _json_number(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def read_weight_decisions(store: PersonaStore) -> pd.DataFrame:
    """Every refresh that made a candidate: created_at, candidate_version, decision, version (live
    after it), responses, reason; oldest first."""
    k = key_weight_refreshes.c
    return store.read_frame(
        sa.select(k.created_at, k.candidate_version, k.decision, k.version, k.responses, k.reason)
        .where(k.candidate_version.is_not(None))
        .order_by(k.refresh_id)
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
