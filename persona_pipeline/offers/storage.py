"""Reads and writes of the offers domain in the persona store."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.offers.recommend import (
    CONTACT_COLUMNS,
    POSITIVE_RESPONSES,
    WEEK_DAYS,
    TicketChanges,
    last_contacts,
    ticket_changes,
    within_limits,
)
from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.service_catalog import ServiceCatalog
from persona_pipeline.store.tables import offer_feedback, service_recommendations, support_tickets


def read_offer_history(store: PersonaStore, since_day: str | None = None) -> pd.DataFrame:
    """Offers made on `since_day` or later (every offer when None)."""
    r = service_recommendations.c
    query = sa.select(r.offer_id, r.device_id, r.service_id, r.trigger, r.offer_day, r.score, r.priority)
    return store.read_frame(query if since_day is None else query.where(r.offer_day >= since_day))


def read_last_contacts(
    store: PersonaStore, pairs: pd.DataFrame, day: str, since_day: str, join_in_database: bool | None = None
) -> pd.DataFrame:
    """`last_contacts` of the (device_id, service_id) `pairs` from the store: per pair, the
    last day from `since_day` to the day before `day` it was offered, or the day of a rejection
    that was the latest answer to its offer made on `since_day` or later, whichever is later;
    pairs with neither are left out. What is read follows the smaller of the pairs and the
    offers made since `since_day`: with more offers than pairs (a pipeline that has run for
    weeks), the pairs go into a temporary table and the database joins them; otherwise the
    offers' last days are read and matched here. `join_in_database` forces one way."""
    if pairs.empty:
        return pd.DataFrame(columns=CONTACT_COLUMNS)
    r = service_recommendations.c
    if join_in_database is None:
        # Counted only as far as it decides: one more offer than there are pairs.
        made = sa.select(r.offer_id).where(r.offer_day >= since_day).limit(len(pairs) + 1).subquery()
        join_in_database = store.scalar(sa.select(sa.func.count()).select_from(made)) > len(pairs)
    wanted = sa.Table(
        "offer_pairs_wanted",
        sa.MetaData(),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("service_id", sa.Text, nullable=False),
        prefixes=["TEMPORARY"],
    )
    offered, rejected = _contact_queries(wanted if join_in_database else None, day, since_day)
    with store.begin() as connection:
        if join_in_database:
            # SQLite creates it outside the transaction: a read that failed midway left it.
            wanted.drop(connection, checkfirst=True)
            wanted.create(connection)
            store.insert_frame(connection, wanted, pairs[["device_id", "service_id"]])
        last_offered = store.read_frame(offered, connection)
        rejections = store.read_frame(rejected, connection)
        if join_in_database:
            wanted.drop(connection)
    rejections = pd.DataFrame(
        {
            "device_id": rejections["device_id"],
            "service_id": rejections["service_id"],
            "rejected_day": pd.to_datetime(rejections["responded_at"], utc=True).dt.strftime("%Y-%m-%d"),
        }
    )
    contacts = last_contacts(last_offered.rename(columns={"last_day": "offer_day"}), rejections, day)
    if join_in_database:
        return contacts
    return contacts.merge(pairs[["device_id", "service_id"]], on=["device_id", "service_id"])[CONTACT_COLUMNS]


def _contact_queries(wanted: sa.Table | None, day: str, since_day: str) -> tuple[sa.Select, sa.Select]:
    """The last offer day before `day` per (device, service) offered since `since_day`, and the
    offers since then whose latest answer is a rejection: of the pairs in `wanted` when given."""
    r, f = service_recommendations.c, offer_feedback.c

    def from_offers() -> sa.Select:
        if wanted is None:
            return sa.select().select_from(service_recommendations)
        matches = (wanted.c.device_id == r.device_id) & (wanted.c.service_id == r.service_id)
        return sa.select().select_from(wanted).join(service_recommendations, matches)

    offered = (
        from_offers()
        .add_columns(r.device_id, r.service_id, sa.func.max(r.offer_day).label("last_day"))
        .where(r.offer_day >= since_day, r.offer_day < day)
        .group_by(r.device_id, r.service_id)
    )
    newest_first = sa.func.row_number().over(
        partition_by=f.offer_id, order_by=(f.responded_at.desc(), f.batch_id.desc(), f.response.desc())
    )
    answers = (
        from_offers()
        .add_columns(r.device_id, r.service_id, f.response, f.responded_at, newest_first.label("rank"))
        .join(offer_feedback, f.offer_id == r.offer_id)
        .where(r.offer_day >= since_day)
        .subquery()
    )
    rejected = sa.select(answers.c.device_id, answers.c.service_id, answers.c.responded_at).where(
        answers.c.rank == 1, answers.c.response == "rejected"
    )
    return offered, rejected


def read_offered_devices(
    store: PersonaStore, service_ids: list[str], since_day: str, day: str
) -> pd.DataFrame:
    """The (service_id, device_id) pairs of `service_ids` offered from `since_day` to the day
    before `day`, once each."""
    r = service_recommendations.c
    query = sa.select(r.service_id, r.device_id).where(r.offer_day >= since_day, r.offer_day < day).distinct()
    return store.read_frame_in(query, r.service_id, service_ids)


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
        PersonaStore.hold_other_writers(connection, table)
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


def write_offers(
    store: PersonaStore,
    offers: pd.DataFrame,
    day: str,
    catalog: ServiceCatalog,
    fleet_devices: int | None = None,
) -> pd.DataFrame:
    """Insert the offers of `day` not stored yet that fit within the catalog's limits (each
    device's daily cap and weekly budget, each service's daily capacity, the fleet's budget for the
    day when `fleet_devices` is given), counting what is
    stored within 6 days either side of `day` when the rows go in (a run that wrote since this
    one read its history takes its slots first); returns the offers inserted. Other writers of
    the table wait until the commit."""
    if offers.empty:
        return offers
    r = service_recommendations.c
    first = (pd.Timestamp(day) - pd.Timedelta(days=WEEK_DAYS - 1)).strftime("%Y-%m-%d")
    last = (pd.Timestamp(day) + pd.Timedelta(days=WEEK_DAYS - 1)).strftime("%Y-%m-%d")
    with store.begin() as connection:
        PersonaStore.hold_other_writers(connection, service_recommendations)
        stored = store.read_frame(
            sa.select(r.offer_id, r.device_id, r.service_id, r.offer_day).where(
                r.offer_day.between(first, last)
            ),
            connection,
        )
        fresh = within_limits(offers, stored, day, catalog, fleet_devices)
        store.insert_frame(connection, service_recommendations, fresh)
    return fresh


def write_tickets(
    store: PersonaStore, anomalies: pd.DataFrame, catalog: ServiceCatalog, day: str, now: pd.Timestamp
) -> TicketChanges:
    """Open, update and resolve support tickets for `day` (see `ticket_changes`) against the
    tickets stored when the rows go in; other writers of the outbox wait until the commit."""
    t = support_tickets.c
    with store.begin() as connection:
        PersonaStore.hold_other_writers(connection, support_tickets)
        stored = store.read_frame(
            sa.select(
                t.ticket_id,
                t.device_id,
                t.cause,
                t.severity,
                t.reason,
                t.status,
                t.last_seen_day,
                t.created_at,
            ).where((t.status == "open") | (t.last_seen_day >= day)),
            connection,
        )
        # Tickets opened before last_seen_day existed were last seen when they were opened.
        opened_day = pd.to_datetime(stored["created_at"], utc=True).dt.strftime("%Y-%m-%d")
        stored["last_seen_day"] = stored["last_seen_day"].fillna(opened_day)
        changes = ticket_changes(anomalies, stored, catalog, day)
        store.insert_frame(connection, support_tickets, changes.opened.assign(created_at=now, updated_at=now))
        if not changes.updated.empty:
            connection.execute(
                support_tickets.update()
                .where(t.ticket_id == sa.bindparam("key"))
                .values(
                    cause=sa.bindparam("new_cause"),
                    severity=sa.bindparam("new_severity"),
                    reason=sa.bindparam("new_reason"),
                    last_seen_day=sa.bindparam("new_last_seen_day"),
                    updated_at=now.to_pydatetime(),
                ),
                changes.updated.astype({"severity": float})
                .rename(columns=lambda c: "key" if c == "ticket_id" else f"new_{c}")
                .to_dict("records"),
            )
        if not changes.resolved.empty:
            for start in range(0, len(changes.resolved), 10_000):
                chunk = changes.resolved["ticket_id"].iloc[start : start + 10_000].tolist()
                connection.execute(
                    support_tickets.update()
                    .where(t.ticket_id.in_(chunk))
                    .values(
                        status="resolved", resolved_at=now.to_pydatetime(), updated_at=now.to_pydatetime()
                    )
                )
    return changes


def read_open_tickets(store: PersonaStore) -> pd.DataFrame:
    """The support system's view of the outbox: every open ticket, oldest first."""
    t = support_tickets.c
    return store.read_frame(
        sa.select(support_tickets).where(t.status == "open").order_by(t.created_at, t.ticket_id)
    )


@dataclass(frozen=True)
class LookalikeExamples:
    """What the lookalike query starts from: per service, `responses` and `accepted` (answered
    offers, those whose latest answer was accepted or used); and the `examples`: service_id,
    accepted, device_id, rank (0 first), the first `per_service` devices of each service and
    answer in the order the offers were made."""

    responses: pd.DataFrame
    examples: pd.DataFrame


def read_lookalike_examples(store: PersonaStore, per_service: int) -> LookalikeExamples:
    """The answered offers' counts per service and each service's first `per_service`
    accepting and other devices, in the order the offers were made (run, then device): a
    device's place is that of its first answered offer of the service, whatever order the
    database would return the join in, so a re-run takes the same ones. Counted and ranked in
    the database: what is read follows the services, not the answers kept."""
    r = service_recommendations.c
    answered = answered_offers()
    counts = store.read_frame(
        sa.select(
            r.service_id,
            sa.func.count().label("responses"),
            sa.func.sum(answered.c.accepted).label("accepted"),
        )
        .join(answered, answered.c.offer_id == r.offer_id)
        .group_by(r.service_id)
    )
    first = (
        sa.select(r.service_id, answered.c.accepted, r.device_id, sa.func.min(r.created_at).label("first_at"))
        .join(answered, answered.c.offer_id == r.offer_id)
        .group_by(r.service_id, answered.c.accepted, r.device_id)
        .subquery()
    )
    in_order = sa.func.row_number().over(
        partition_by=(first.c.service_id, first.c.accepted), order_by=(first.c.first_at, first.c.device_id)
    )
    ranked = sa.select(
        first.c.service_id, first.c.accepted, first.c.device_id, (in_order - 1).label("rank")
    ).subquery()
    examples = store.read_frame(
        sa.select(ranked)
        .where(ranked.c.rank < per_service)
        .order_by(ranked.c.service_id, ranked.c.accepted, ranked.c.rank)
    )
    return LookalikeExamples(
        responses=counts.astype({"responses": "int64", "accepted": "int64"}),
        examples=examples.assign(accepted=examples["accepted"].astype(bool)),
    )


def tickets_by_status(store: PersonaStore) -> dict[str, int]:
    t = support_tickets.c
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(t.status, sa.func.count()).group_by(t.status)).all()
    return {status: int(count) for status, count in rows}


def offers_by_trigger(store: PersonaStore) -> list[tuple[str, int]]:
    """(trigger, offers) over every offer made, by trigger name."""
    r = service_recommendations.c
    query = sa.select(r.trigger, sa.func.count()).group_by(r.trigger).order_by(r.trigger)
    with store.engine.connect() as connection:
        return [(trigger, int(count)) for trigger, count in connection.execute(query).all()]
