"""`erase_devices_job`: a right-to-be-forgotten request, carried out in every store."""

import json
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import pandas as pd
from pydantic import Field

from persona_pipeline.erasure.storage import (
    HISTORY,
    delete_device_rows,
    delete_history_rows,
    devices_of,
    record_erasure,
    suppress,
)
from persona_pipeline.erasure.subjects import unique_ids
from persona_pipeline.resources import PersonaStore, VectorIndex
from persona_pipeline.resources.vector_index import VECTOR_INDEX_POOL, persona_collections, point_ids
from persona_pipeline.retries import STORE_RETRY


class ErasureConfig(dg.Config):
    device_ids: list[str] = Field(default_factory=list, description="Devices to erase.")
    customer_ids: list[str] = Field(
        default_factory=list,
        description="Customers to erase: every device any store links to them, and their future rows.",
    )
    requested_by: str = Field(
        description="Who asked (a ticket or case reference, not a person's data): kept in the audit."
    )


@dg.op(pool=VECTOR_INDEX_POOL, retry_policy=STORE_RETRY)
def erase_devices(
    context: dg.OpExecutionContext,
    config: ErasureConfig,
    persona_store: PersonaStore,
    vector_index: VectorIndex,
) -> dg.Output[None]:
    """Delete the devices (and the customers' devices) from every table and every Qdrant
    collection, add them to the suppression list ingest honours, and record an audit row with
    counts only. Safe to run again: a second run finds nothing left and changes nothing."""
    device_ids = unique_ids(config.device_ids, "device_ids")
    customer_ids = unique_ids(config.customer_ids, "customer_ids")
    if not device_ids and not customer_ids:
        raise dg.Failure(
            "erase_devices: give at least one of device_ids or customer_ids", allow_retries=False
        )
    request = {
        "request_id": context.run_id.replace("-", ""),  # the same for every attempt of the run
        "requested_by": config.requested_by,
        "requested_at": pd.Timestamp.now(tz="UTC"),
        "device_ids_requested": len(device_ids),
        "customer_ids_requested": len(customer_ids),
    }
    devices = devices_of(persona_store, device_ids, customer_ids)

    @contextmanager
    def recorded(deleted: dict[str, int], points: int = 0) -> Iterator[None]:
        """What the body deletes outside the store (it cannot be rolled back with it) is counted
        in the audit row in one transaction with it: a failed delete leaves no count, a failed
        count no delete (only a failed commit after the delete goes uncounted)."""
        with persona_store.begin() as connection:
            record_erasure(connection, request, deleted, points, len(devices), completed_at=None)
            yield

    # Qdrant first: a failure there leaves the store's rows, so a retry still finds the devices.
    with vector_index.open() as index:
        ids = point_ids(devices)
        for collection in persona_collections(index):
            found = len(index.retrieve(collection, ids))
            if found:
                with recorded({}, points=found):
                    index.delete(collection, ids)

    # Then the update history's files, before the rows that link a customer to its devices go.
    delete_history_rows(persona_store, devices, each_file=lambda rows: recorded({HISTORY: rows}))

    with persona_store.begin() as connection:
        rows = {HISTORY: 0, **delete_device_rows(connection, devices)}
        audit = record_erasure(
            connection, request, rows, 0, len(devices), completed_at=pd.Timestamp.now(tz="UTC")
        )
        suppressed = suppress(
            persona_store, connection, devices, customer_ids, audit["request_id"], audit["requested_at"]
        )
    rows_by_table = json.loads(audit["rows_by_table"])
    context.log.info(
        f"erasure {audit['request_id']}: {audit['devices_erased']} devices, {audit['rows_deleted']} rows and "
        f"{audit['points_deleted']} points deleted; {suppressed} subjects suppressed"
    )
    return dg.Output(
        None,
        metadata={
            "request_id": dg.MetadataValue.text(audit["request_id"]),
            "devices_erased": dg.MetadataValue.int(audit["devices_erased"]),
            "rows_deleted": dg.MetadataValue.int(audit["rows_deleted"]),
            "points_deleted": dg.MetadataValue.int(audit["points_deleted"]),
            "subjects_suppressed": dg.MetadataValue.int(suppressed),
            "rows_by_table": dg.MetadataValue.json(rows_by_table),
        },
    )


@dg.job(
    description="Right-to-be-forgotten: erase devices or customers from the persona store and every "
    "Qdrant collection, keep them out of later ingests, and record an audit row (counts only).",
    tags={"domain": "privacy"},
)
def erase_devices_job() -> None:
    erase_devices()
