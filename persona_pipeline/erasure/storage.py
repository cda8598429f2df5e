"""Erasure in the persona store: find a request's devices, delete their rows, keep them out."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.erasure.subjects import CUSTOMER, DEVICE, Suppression, hash_texts
from persona_pipeline.resources import PersonaStore
from persona_pipeline.store import tables

# SQLite allows 32,766 bound parameters per statement; stay far below on every backend.
ID_CHUNK = 900

# Every table with a device_id column, children before the rows they point to. The update
# history's files are rewritten by `delete_history_rows`.
DEVICE_TABLES: tuple[sa.Table, ...] = (
    tables.index_updates,
    tables.index_update_rejects,
    tables.device_profiles,
    tables.profile_changes,
    tables.persona_vectors,
    tables.vector_index_state,
    tables.vector_index_clusters,
    tables.segment_members,
    tables.device_clusters,
    tables.anomaly_scores,
    tables.support_tickets,
    tables.service_recommendations,
)


def _chunks(values: Sequence[str]) -> list[Sequence[str]]:
    return [values[start : start + ID_CHUNK] for start in range(0, len(values), ID_CHUNK)]


def devices_of(store: PersonaStore, device_ids: list[str], customer_ids: list[str]) -> list[str]:
    """The requested devices plus every device any store links to a requested customer."""
    found = set(device_ids) | store.history.devices_of_customers(customer_ids)
    for chunk in _chunks(customer_ids):
        for table in (tables.device_profiles, tables.persona_vectors):
            query = sa.select(table.c.device_id).where(table.c.customer_id.in_(chunk)).distinct()
            found.update(store.read_frame(query)["device_id"].tolist())
    return sorted(found)


HISTORY = "update_history"  # the update history's rows in an erasure's counts


def delete_history_rows(
    store: PersonaStore, devices: list[str], each_file: Callable[[int], AbstractContextManager] | None = None
) -> int:
    """Rewrite the update history's files without the rows of `devices`; rows removed.
    `each_file(rows)`: entered around each file's rewrite."""
    return store.history.remove_devices(devices, each_file)


def delete_device_rows(connection: sa.Connection, devices: list[str]) -> dict[str, int]:
    """Delete every row of `devices` from the persona store; rows deleted per table."""
    deleted: dict[str, int] = {}
    offers = tables.service_recommendations
    for chunk in _chunks(devices):
        their_offers = sa.select(offers.c.offer_id).where(offers.c.device_id.in_(chunk))
        offer_ids = [row[0] for row in connection.execute(their_offers)]
        feedback = connection.execute(
            tables.offer_feedback.delete().where(tables.offer_feedback.c.offer_id.in_(their_offers))
        ).rowcount
        deleted["offer_feedback"] = deleted.get("offer_feedback", 0) + feedback
        held = tables.offer_feedback_held
        answered_later = connection.execute(held.delete().where(held.c.offer_id.in_(their_offers))).rowcount
        deleted["offer_feedback_held"] = deleted.get("offer_feedback_held", 0) + answered_later
        rejected = 0
        for offer_id in offer_ids:  # a feedback reject keeps its raw line: find the offer id in it
            rejected += connection.execute(
                tables.offer_feedback_rejects.delete().where(
                    tables.offer_feedback_rejects.c.raw.contains(offer_id, autoescape=True)
                )
            ).rowcount
        deleted["offer_feedback_rejects"] = deleted.get("offer_feedback_rejects", 0) + rejected
        for table in DEVICE_TABLES:
            count = connection.execute(table.delete().where(table.c.device_id.in_(chunk))).rowcount
            deleted[table.name] = deleted.get(table.name, 0) + count
    # Rejects of lines that could not be parsed have no device id: their raw text names it.
    rejects = tables.index_update_rejects
    unparsed = 0
    for device in devices:
        quoted = json.dumps(device)
        unparsed += connection.execute(
            rejects.delete().where(
                rejects.c.device_id.is_(None),
                sa.or_(
                    rejects.c.raw.contains(quoted, autoescape=True),
                    rejects.c.raw.startswith(device + ",", autoescape=True),
                ),
            )
        ).rowcount
    deleted["index_update_rejects"] = deleted.get("index_update_rejects", 0) + unparsed
    # The newest event time may have gone with them: without a run on record, every shard's next
    # persona_vectors computes all its devices. A vectors run under way records no run after this
    # (it counts the erasure requests; the table is held until this transaction ends).
    PersonaStore.hold_other_writers(connection, tables.persona_vector_runs)
    connection.execute(tables.persona_vector_runs.delete())
    # The anomaly norms were fitted with their vectors (a detector may keep its training sample):
    # the next anomaly_scores scores every device and fits them without.
    connection.execute(tables.anomaly_norms.delete())
    return deleted


def record_erasure(
    connection: sa.Connection,
    request: dict,
    deleted: dict[str, int],
    points: int,
    devices: int,
    completed_at: pd.Timestamp | None,
) -> dict:
    """Add what one part of an erasure deleted (rows per table, points) to the request's audit row,
    made by the first part that records anything: the index's points and the history's files
    cannot be rolled back with the store, so each is recorded once deleted, and a retried request
    counts what every attempt deleted. `completed_at` once every store is done; a request whose
    retries ran out keeps its row without one. `request`: request_id, requested_by, requested_at,
    device_ids_requested, customer_ids_requested. Returns the row."""
    audits = tables.erasure_requests
    mine = audits.c.request_id == request["request_id"]
    earlier = connection.execute(sa.select(audits).where(mine)).mappings().first()
    by_table = json.loads(earlier["rows_by_table"]) if earlier else {}
    for name, count in deleted.items():
        by_table[name] = by_table.get(name, 0) + count
    row = {
        **request,
        "requested_at": earlier["requested_at"] if earlier else request["requested_at"],
        "completed_at": completed_at,
        "devices_erased": max(devices, earlier["devices_erased"] if earlier else 0),
        "rows_deleted": sum(by_table.values()),
        "points_deleted": points + (earlier["points_deleted"] if earlier else 0),
        "rows_by_table": json.dumps(by_table, sort_keys=True),
    }
    connection.execute(audits.delete().where(mine))
    connection.execute(audits.insert(), [row])
    return row


def suppress(
    store: PersonaStore,
    connection: sa.Connection,
    devices: list[str],
    customers: list[str],
    request_id: str,
    at: pd.Timestamp,
) -> int:
    """Add the hashes of `devices` and `customers` to the suppression list; a subject already
    listed keeps the request that listed it first."""
    subjects = [(DEVICE, text) for text in hash_texts(devices)]
    subjects += [(CUSTOMER, text) for text in hash_texts(customers)]
    rows = pd.DataFrame(subjects, columns=["subject_kind", "subject_hash"])
    store.upsert_newer(
        tables.suppressed_subjects,
        rows.assign(request_id=request_id, suppressed_at=at),
        ["subject_kind", "subject_hash"],
        newer_than_existing=lambda _stored, _incoming: sa.false(),
        connection=connection,
    )
    return len(rows)


def read_suppression(store: PersonaStore) -> Suppression:
    rows = store.read_frame(
        sa.select(tables.suppressed_subjects.c.subject_kind, tables.suppressed_subjects.c.subject_hash)
    )
    by_kind = rows.groupby("subject_kind")["subject_hash"].agg(list) if not rows.empty else pd.Series()
    return Suppression.from_texts(by_kind.get(DEVICE, []), by_kind.get(CUSTOMER, []))
