"""The Qdrant server path: how a new collection is laid out (shards, replicas, vectors on disk,
quantization, payload indexes) and parallel batch writes. No Qdrant server runs here, so the
client that would talk to one is replaced by a recorder in front of qdrant-client's local mode:
every call runs for real on the local engine, and the test reads what a server would have got."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from persona_pipeline import settings
from persona_pipeline.resources.vector_index import VectorIndex, VectorIndexError, point_ids
from persona_pipeline.resources.vector_stores import qdrant_client_store

pytestmark = pytest.mark.store_agnostic

URL = "http://qdrant.internal:6333"
COLLECTION = "personas_space-w1"


class RecordingClient:
    """qdrant-client's local mode behind a recorder of each call's method and arguments;
    `fail_upsert` makes that upsert call (1-based) fail as a server's refusal would."""

    def __init__(self, fail_upsert: int | None = None) -> None:
        self.local = QdrantClient(location=":memory:")
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail_upsert = fail_upsert
        # A server takes requests side by side; the local engine does not, so they take turns
        # here, and the recorder counts how many were sent before the previous ones came back.
        self.turn = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def __getattr__(self, name: str):
        method = getattr(self.local, name)

        def recorded(*args, **kwargs):
            with self.turn:
                self.calls.append((name, args, kwargs))
                number = self.called(name)
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                time.sleep(0.005)  # the network's share of a request
                with self.turn:
                    if name == "upsert" and number == self.fail_upsert:
                        raise RuntimeError("the server refused the batch")
                    if name == "create_payload_index":
                        return None  # the local engine has none (and warns); a server builds it
                    return method(*args, **kwargs)
            finally:
                with self.turn:
                    self.in_flight -= 1

        return recorded

    def called(self, name: str) -> int:
        return sum(1 for called, _, _ in self.calls if called == name)

    def arguments(self, name: str) -> list[dict]:
        return [kwargs | {"args": args} for called, args, kwargs in self.calls if called == name]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> dict[str, RecordingClient]:
    """The client a VectorIndex with a url opens: the latest is under "client"."""
    opened: dict[str, RecordingClient] = {}
    failing: dict[str, int | None] = {"upsert": None}

    def connect(**connection):
        assert connection["url"] == URL
        opened["client"] = RecordingClient(failing["upsert"])
        return opened["client"]

    monkeypatch.setattr(qdrant_client_store, "QdrantClient", connect)
    opened["failing"] = failing  # type: ignore[assignment]
    return opened


def test_a_server_collection_gets_its_shards_replicas_storage_quantization_and_payload_indexes(server):
    index = VectorIndex(url=URL, shards=3, replicas=2, vectors_on_disk=True, quantization="scalar")
    with index.open() as store:
        assert store.ensure_collection(COLLECTION, 4) is True
    [created] = server["client"].arguments("create_collection")
    assert (created["shard_number"], created["replication_factor"]) == (3, 2)
    assert created["vectors_config"].size == 4 and created["vectors_config"].on_disk is True
    scalar = created["quantization_config"].scalar
    assert scalar.type == models.ScalarType.INT8 and scalar.always_ram is True
    indexes = server["client"].arguments("create_payload_index")
    indexed = {call["args"][1]: call["field_schema"] for call in indexes}
    assert indexed == {
        "device_id": models.PayloadSchemaType.KEYWORD,  # the lookalike query leaves devices out by it
        "cluster_id": models.PayloadSchemaType.INTEGER,
        "weights_version": models.PayloadSchemaType.INTEGER,
    }


def test_an_existing_server_collection_gets_the_payload_indexes_it_lacks(server):
    """A collection whose indexes were never made (a failure after it was created, or made before
    this version) gets them from the next persona_index run."""
    with VectorIndex(url=URL).open() as store:
        server["client"].local.create_collection(
            COLLECTION, vectors_config=models.VectorParams(size=4, distance=models.Distance.EUCLID)
        )
        assert store.ensure_collection(COLLECTION, 4) is False
    indexed = {call["args"][1] for call in server["client"].arguments("create_payload_index")}
    assert indexed == {"device_id", "cluster_id", "weights_version"}


def test_a_server_collection_by_default_is_one_shard_in_ram_without_quantization(server):
    with VectorIndex(url=URL).open() as store:
        store.ensure_collection(COLLECTION, 4)
    [created] = server["client"].arguments("create_collection")
    assert (created["shard_number"], created["replication_factor"]) == (1, 1)
    assert created["vectors_config"].on_disk is None and created["quantization_config"] is None


def test_parallel_batches_write_every_point_once(server):
    devices = [f"d{i}" for i in range(1000)]
    vectors = np.random.default_rng(5).random((len(devices), 4), dtype=np.float32)
    payloads = [{"device_id": d, "cluster_id": i % 7} for i, d in enumerate(devices)]
    with VectorIndex(url=URL, write_parallelism=4).open() as store:
        store.ensure_collection(COLLECTION, 4)
        assert store.upsert(COLLECTION, point_ids(devices), vectors, payloads, batch_size=64) == 1000
        stored = {p.id: p for p in store.scroll(COLLECTION, with_vectors=True, page=300)}
    assert server["client"].called("upsert") == 16  # ceil(1000 / 64) batches, each once
    assert server["client"].most_in_flight > 1  # sent side by side, not one after the other
    assert sorted(stored) == sorted(point_ids(devices))
    for device, point, vector in zip(devices, point_ids(devices), vectors, strict=True):
        assert stored[point].payload["device_id"] == device
        np.testing.assert_allclose(stored[point].vector, vector, rtol=1e-6)


def test_a_failed_batch_among_parallel_ones_says_how_many_points_were_written(server):
    server["failing"]["upsert"] = 3
    devices = [f"d{i}" for i in range(1024)]
    vectors = np.zeros((len(devices), 4), dtype=np.float32)
    with VectorIndex(url=URL, write_parallelism=4).open() as store:
        store.ensure_collection(COLLECTION, 4)
        with pytest.raises(VectorIndexError, match=r"failed after \d+ of 1024 points were written") as raised:
            store.upsert(COLLECTION, point_ids(devices), vectors, [{} for _ in devices], batch_size=64)
        written = int(re.search(r"failed after (\d+) of", str(raised.value)).group(1))
        assert 0 < written < 1024 and written % 64 == 0
        assert store.count(COLLECTION) == written  # what it says is what landed; a re-run writes all


def test_parallel_writes_stop_sending_batches_after_one_fails(server):
    """A server that refuses or times out is not sent the rest of the batches: at most the ones
    already in flight go out after the first failure."""
    server["failing"]["upsert"] = 1
    devices = [f"d{i}" for i in range(40 * 64)]
    with VectorIndex(url=URL, write_parallelism=4).open() as store:
        store.ensure_collection(COLLECTION, 4)
        with pytest.raises(VectorIndexError, match="failed after"):
            store.upsert(COLLECTION, point_ids(devices), np.zeros((len(devices), 4)), [{}] * len(devices), 64)
    assert server["client"].called("upsert") <= 4 + 4  # the first window, and those sent as it drained


def test_the_layout_settings_come_from_the_environment_and_a_bad_value_is_named():
    environ = {
        "PERSONA_QDRANT_SHARDS": "6",
        "PERSONA_QDRANT_REPLICAS": " 2 ",
        "PERSONA_QDRANT_VECTORS_ON_DISK": "true",
        "PERSONA_QDRANT_QUANTIZATION": "scalar",
        "PERSONA_QDRANT_WRITE_PARALLELISM": "",
    }
    layout = settings.qdrant_server_layout(environ)
    assert layout == {"shards": 6, "replicas": 2, "vectors_on_disk": True, "quantization": "scalar"}
    assert VectorIndex(url=URL, **layout).shards == 6
    with pytest.raises(ValueError, match=r"^PERSONA_QDRANT_SHARDS='six' is not a whole number$"):
        settings.qdrant_server_layout({"PERSONA_QDRANT_SHARDS": "six"})
    with pytest.raises(ValueError, match=r"^PERSONA_QDRANT_VECTORS_ON_DISK='maybe': expected true or false$"):
        settings.qdrant_server_layout({"PERSONA_QDRANT_VECTORS_ON_DISK": "maybe"})
    with pytest.raises(ValueError, match=r"^PERSONA_QDRANT_QUANTIZATION='binary': expected none or scalar$"):
        settings.qdrant_server_layout({"PERSONA_QDRANT_QUANTIZATION": "binary"})
    with pytest.raises(ValueError, match=r"^PERSONA_QDRANT_SHARDS=0: expected 1 to 256$"):
        settings.qdrant_server_layout({"PERSONA_QDRANT_SHARDS": "0"})
    with pytest.raises(Exception, match="quantization"):
        VectorIndex(url=URL, quantization="binary")
    with pytest.raises(Exception, match="shards"):
        VectorIndex(url=URL, shards=0)
