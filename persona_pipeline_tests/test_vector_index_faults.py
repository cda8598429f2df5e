"""The vector index failing in the middle of persona_index's writes, on every embedded engine: the
run fails saying where, and a retry completes the collection with one point per device, nothing
duplicated or lost.

No Qdrant server runs here, so the fault is injected into the real embedded index: through
qdrant-client, the connection drops after the first upsert batch (what a server going away looks
like); on Qdrant Edge, the disk fills up after the first batch. These are the only fakes here.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import dagster as dg
import httpx
import numpy as np
import pytest
from qdrant_client.http.exceptions import ResponseHandlingException

from persona_pipeline.feedback.assets import key_weights
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.personas import storage
from persona_pipeline.personas.assets import ONE_POINT_CHECK, device_profiles, persona_index, persona_vectors
from persona_pipeline.personas.weights import current_weights, insert_weights
from persona_pipeline.resources import VectorIndex
from persona_pipeline.resources.vector_index import StoredPoint, VectorStore, point_id
from persona_pipeline.resources.vector_stores.qdrant_client_store import QdrantClientStore
from persona_pipeline_tests.conftest import ENGINES, check_named, update, write_jsonl

# key_weights records the configured weights the vectors are built with.
VECTOR_ASSETS = [key_weights, persona_vectors, persona_index]

pytestmark = pytest.mark.parametrize("embedded_engine", ENGINES)

DAY = "2026-03-01"
DEVICES = [f"d{i}" for i in range(5)]
BATCH = {"ops": {"persona_index": {"config": {"batch_size": 2}}}}
FAILURES = {"local": "Connection refused", "edge": "No space left on device"}


class _FailsAfterOneWrite:
    """Stands in for a qdrant-client or an Edge shard; its writes fail with `error` from the second on."""

    def __init__(self, engine: object, error: Exception) -> None:
        self._engine = engine
        self._error = error
        self._writes = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def _fail_after_one(self) -> None:
        self._writes += 1
        if self._writes > 1:
            raise self._error

    def upsert(self, *args, **kwargs):  # qdrant-client
        self._fail_after_one()
        return self._engine.upsert(*args, **kwargs)

    def update(self, operation):  # Edge shard
        self._fail_after_one()
        return self._engine.update(operation)


def break_writes_after_one_batch(store: VectorStore) -> None:
    if isinstance(store, QdrantClientStore):
        refused = ResponseHandlingException(httpx.ConnectError("[Errno 111] Connection refused"))
        store._client = _FailsAfterOneWrite(store._client, refused)
        return
    # What qdrant_edge raises when a write hits a full disk.
    full = Exception("Service runtime error: No space left on device (os error 28)")
    real_shard = store._shard
    broken: dict[int, _FailsAfterOneWrite] = {}

    def shard(collection: str) -> _FailsAfterOneWrite:
        real = real_shard(collection)
        return broken.setdefault(id(real), _FailsAfterOneWrite(real, full))

    store._shard = shard


class DropsMidWrite(VectorIndex):
    """The real embedded index; its next `failing_runs` sessions fail after the first write."""

    failing_runs: ClassVar[int] = 0

    @contextmanager
    def open(self) -> Iterator[VectorStore]:
        with super().open() as store:
            if DropsMidWrite.failing_runs > 0:
                DropsMidWrite.failing_runs -= 1
                break_writes_after_one_batch(store)
            yield store


def ingest(landing, resources, instance) -> None:
    rows = [
        update(d, "device.location.city", "Berlin", f"{DAY}T10:00:00Z", customer=f"c-{d}") for d in DEVICES
    ]
    rows += [
        update(d, "device.usage.app_maps_duration", 600 * (i + 1), f"{DAY}T11:00:00Z")
        for i, d in enumerate(DEVICES)
    ]
    write_jsonl(landing, DAY, rows)
    assert dg.materialize(
        [index_updates, device_profiles], resources=resources, instance=instance, partition_key=DAY
    ).success


def points_of(index: VectorIndex, collection: str) -> dict[str, StoredPoint]:
    with index.open() as store:
        return {p.id: p for p in store.scroll(collection, with_vectors=True)}


def alias_target(index: VectorIndex) -> str | None:
    with index.open() as store:
        return store.alias_target(index.alias)


def assert_complete(index: VectorIndex, store, collection: str, weights_version: int) -> None:
    """Exactly one point per device, under its uuid5 id, with the stored vector and payload."""
    stored = storage.read_stored_vectors(store)
    points = points_of(index, collection)
    assert sorted(points) == sorted(point_id(d) for d in DEVICES)
    for device, customer, vector in zip(stored.device_ids, stored.customer_ids, stored.matrix, strict=True):
        point = points[point_id(device)]
        assert point.payload == {
            "device_id": device,
            "customer_id": customer,
            "weights_version": weights_version,
        }  # no cluster_id: device_clusters writes it
        np.testing.assert_allclose(point.vector, vector, rtol=1e-6)
    with index.open() as store:
        assert store.count(index.alias) == len(DEVICES)


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """The innermost error of each failed attempt of persona_index (Dagster wraps it)."""
    messages = []
    for event in result.all_events:
        if event.step_key == "persona_index" and (event.is_step_failure or event.is_step_up_for_retry):
            error = event.event_specific_data.error
            while error.cause is not None:
                error = error.cause
            messages.append(error.message)
    return messages


def test_a_write_interrupted_on_the_first_attempt_is_finished_by_the_retry_policy(
    landing, resources, instance, monkeypatch, embedded_engine
):
    ingest(landing, resources, instance)
    monkeypatch.setattr(DropsMidWrite, "failing_runs", 1)
    index = DropsMidWrite(path=resources["vector_index"].path, embedded_engine=embedded_engine)

    result = dg.materialize(
        VECTOR_ASSETS,
        resources={**resources, "vector_index": index},
        instance=instance,
        run_config=BATCH,
    )

    assert result.success
    (message,) = failure_messages(result)  # one attempt failed, the retry succeeded
    assert f"vector index at {index.location}" in message
    assert "after 2 of 5 points" in message and FAILURES[embedded_engine] in message
    collection = alias_target(index)
    assert collection is not None
    assert_complete(index, resources["persona_store"], collection, weights_version=1)
    check = check_named(result, ONE_POINT_CHECK)
    assert check.check_name == ONE_POINT_CHECK and check.passed


def test_a_failed_rebuild_keeps_the_alias_on_the_complete_collection_and_a_rerun_finishes_it(
    landing, resources, instance, monkeypatch, embedded_engine
):
    ingest(landing, resources, instance)
    index = resources["vector_index"]
    assert dg.materialize(VECTOR_ASSETS, resources=resources, instance=instance).success
    first = alias_target(index)
    store = resources["persona_store"]
    learned = {**current_weights(store).weights, "device.location.city": 0.4}
    insert_weights(store, 2, learned, "feedback")

    monkeypatch.setattr(DropsMidWrite, "failing_runs", 99)  # every attempt of the run
    faulty = DropsMidWrite(path=index.path, embedded_engine=embedded_engine)
    failed = dg.materialize(
        VECTOR_ASSETS,
        resources={**resources, "vector_index": faulty},
        instance=instance,
        run_config=BATCH,
        raise_on_error=False,
    )

    assert not failed.success
    messages = failure_messages(failed)
    assert len(messages) == 3  # the first attempt and the retry policy's two retries
    assert all(f"vector index at {index.location}" in m and "after 2 of 5 points" in m for m in messages)
    assert all(FAILURES[embedded_engine] in m for m in messages)
    second = f"personas_{storage.read_vector_summaries(store)['space'].iloc[0]}"
    assert second != first and second.endswith("-w2")
    assert alias_target(index) == first  # still the complete collection of weights v1
    kept = points_of(index, first)
    assert sorted(kept) == sorted(point_id(d) for d in DEVICES)
    assert {p.payload["weights_version"] for p in kept.values()} == {1}
    assert len(points_of(index, second)) == 2  # only the first batch arrived

    monkeypatch.setattr(DropsMidWrite, "failing_runs", 0)
    rerun = dg.materialize(
        VECTOR_ASSETS,
        resources=resources,
        instance=instance,
        run_config=BATCH,
    )

    assert rerun.success
    assert alias_target(index) == second
    assert_complete(index, store, second, weights_version=2)
    metadata = rerun.asset_materializations_for_node("persona_index")[0].metadata
    assert metadata["previous_collection"].value == first
    assert metadata["points"].value == len(DEVICES)
    assert check_named(rerun, ONE_POINT_CHECK).passed
