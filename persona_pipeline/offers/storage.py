"""Reads and writes of the offers domain in the persona store."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.offers.recommend import POSITIVE_RESPONSES, under_daily_cap
from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import offer_feedback, service_recommendations, support_tickets


def read_offer_history(store: PersonaStore, since_day: str | None = None) -> pd.DataFrame:
    """Offers made on `since_day` or later (every offer when None)."""
    r = service_recommendations.c
    query = sa.select(r.offer_id, r.device_id, r.service_id, r.trigger, r.offer_day, r.score, r.priority)
    return store.read_frame(query if since_day is None else query.where(r.offer_day >= since_day))


def answered_offers() -> sa.Subquery:
    """One row per offer with a response: offer_id, accepted (1 when its latest response, by
    responded_at over every batch, was accepted or used, else 0; at the same instant the later
    batch id, then the later response name in text order, is the latest)."""
    f = offer_feedback.c
    newest_first = sa.func.row_number().over(
        partition_by=f.offer_id, order_by=(f.responded_at.desc(), f.batch_id.desc(), f.response.desc())
    )
    ranked = sa.select(f.offer_id, f.response, newest_first.label("rank")).subquery()
    positive = sa.case((ranked.c.response.in_(POSITIVE_RESPONSES), 1), else_=0)
    return sa.select(ranked.c.offer_id, positive.label("accepted")).where(ranked.c.rank == 1).subquery()


def read_acceptance(store: PersonaStore) -> pd.DataFrame:
    """Responses per (segment at offer time, service): accepted (accepted or used) and all."""
    r = service_recommendations.c
    responded = answered_offers()
    query = (
        sa.select(
            r.cluster_id,
            r.service_id,
            sa.func.sum(responded.c.accepted).label("accepted"),
            sa.func.count().label("responses"),
        )
        .join(responded, responded.c.offer_id == r.offer_id)
        .group_by(r.cluster_id, r.service_id)
    )
    frame = store.read_frame(query)
    return frame.astype({"accepted": "float64", "responses": "float64"})


def insert_new(store: PersonaStore, table: sa.Table, frame: pd.DataFrame, key: str) -> int:
    """Insert rows whose key is not stored yet; existing rows are left as they are. Other writers
    of the table wait until the commit, so two runs never both find a key missing."""
    if frame.empty:
        return 0
    with store.begin() as connection:
        hold_other_writers(connection, table)
        existing = set()
        keys = frame[key].tolist()
        for start in range(0, len(keys), 10_000):
            chunk = keys[start : start + 10_000]
            existing.update(
                connection.execute(sa.select(table.c[key]).where(table.c[key].in_(chunk))).scalars()
            )
        fresh = frame[~frame[key].isin(existing)]
        store.insert_frame(connection, table, fresh)
    return len(fresh)


def hold_other_writers(connection: sa.Connection, table: sa.Table) -> None:
    """Make other writers of `table` wait until this transaction ends, before it reads what it
    will check its rows against; readers go on. PostgreSQL: a lock on the table that only
    writers conflict with. SQLite has one writer at a time: a statement that writes nothing
    still begins the write transaction now rather than at the first insert."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE"))
    else:
        connection.execute(table.delete().where(sa.false()))


def write_offers(store: PersonaStore, offers: pd.DataFrame, day: str, daily_cap: int) -> pd.DataFrame:
    """Insert the offers of `day` not stored yet that fit under each device's daily cap, counting
    what is stored for the day when the rows go in (a run that wrote since this one read its
    history takes its slots first); returns the offers inserted. An offer id hashes (device,
    service, day), so only that day's offers can hold it: one query on the day instead of one
    per 10,000 ids. Other writers of the table wait until the commit."""
    if offers.empty:
        return offers
    r = service_recommendations.c
    with store.begin() as connection:
        hold_other_writers(connection, service_recommendations)
        stored = store.read_frame(sa.select(r.offer_id, r.device_id).where(r.offer_day == day), connection)
        fresh = under_daily_cap(offers, stored, daily_cap)
        store.insert_frame(connection, service_recommendations, fresh)
    return fresh


def write_tickets(store: PersonaStore, tickets: pd.DataFrame) -> int:
    return insert_new(store, support_tickets, tickets, "ticket_id")


def read_service_responses(store: PersonaStore) -> pd.DataFrame:
    """Per responded offer: service_id, device_id, accepted (accepted or used), in the order the
    offers were made (run, then device, as each run inserts them), whatever order the database
    would return the join in: the lookalike query takes each service's first examples, and a
    re-run must take the same ones."""
    r = service_recommendations.c
    answered = answered_offers()
    frame = store.read_frame(
        sa.select(r.service_id, r.device_id, answered.c.accepted)
        .join(answered, answered.c.offer_id == r.offer_id)
        .order_by(r.created_at, r.device_id, r.offer_id)
    )
    return frame.assign(accepted=frame["accepted"].astype(bool))
