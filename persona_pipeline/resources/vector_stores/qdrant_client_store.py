"""The vector index through `qdrant-client`: a Qdrant server or cluster, or its local mode."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from persona_pipeline.resources.vector_stores.base import (
    Hit,
    StoredPoint,
    VectorIndexError,
    VectorStore,
    check_point_counts,
)

# What the client raises for a server's refusal or absence, and its local mode for bad requests.
ENGINE_ERRORS = (ResponseHandlingException, UnexpectedResponse, ValueError, RuntimeError)
# Payload indexes on a server (local mode has none): device_id, which the lookalike query filters
# out by; cluster_id and weights_version, to select a segment's or a weights version's points.
PAYLOAD_INDEXES = {
    "device_id": models.PayloadSchemaType.KEYWORD,
    "cluster_id": models.PayloadSchemaType.INTEGER,
    "weights_version": models.PayloadSchemaType.INTEGER,
}


@dataclass(frozen=True)
class ServerLayout:
    """How a server lays out a new collection, and how many batches are written at once (the
    VectorIndex resource validates the values)."""

    shards: int = 1
    replicas: int = 1
    vectors_on_disk: bool = False
    quantization: str = "none"
    write_parallelism: int = 1

    def quantization_config(self) -> models.ScalarQuantization | None:
        if self.quantization == "none":
            return None
        # int8 copies of the vectors kept in RAM (a quarter of float32), the originals where
        # vectors_on_disk puts them; search rescores with the originals.
        return models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
        )


class QdrantClientStore(VectorStore):
    """A Qdrant server (url, api_key) or qdrant-client's local mode (path)."""

    def __init__(
        self,
        location: str,
        url: str | None = None,
        api_key: str | None = None,
        path: str | None = None,
        timeout: int = 30,
        layout: ServerLayout | None = None,
    ) -> None:
        self.location = location
        self.server = bool(url)
        self.layout = layout or ServerLayout()
        try:
            if url:
                self._client = QdrantClient(url=url, api_key=api_key, timeout=timeout)
            else:
                self._client = QdrantClient(path=path)
        except Exception as exc:
            raise VectorIndexError(f"cannot open the vector index at {location}: {exc}", str(exc)) from None

    @contextmanager
    def _engine(self) -> Iterator[None]:
        try:
            yield
        except ENGINE_ERRORS as exc:
            raise VectorIndexError(f"vector index at {self.location} failed: {exc}", str(exc)) from None

    def close(self) -> None:
        self._client.close()

    def collections(self) -> list[str]:
        with self._engine():
            return sorted(c.name for c in self._client.get_collections().collections)

    def dimensions(self, collection: str) -> int | None:
        with self._engine():
            if not self._client.collection_exists(collection):
                return None
            return self._client.get_collection(collection).config.params.vectors.size

    def create_collection(self, name: str, dimensions: int) -> None:
        layout = self.layout if self.server else ServerLayout()
        with self._engine():
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=dimensions, distance=models.Distance.EUCLID, on_disk=layout.vectors_on_disk or None
                ),
                shard_number=layout.shards,
                replication_factor=layout.replicas,
                quantization_config=layout.quantization_config(),
            )

    def ensure_collection(self, name: str, dimensions: int) -> bool:
        """As any store's, and on a server the payload indexes too, each time: one the collection
        lacks (a failure after it was created, or made before they were) is made; asking for an
        index that exists changes nothing."""
        created = super().ensure_collection(name, dimensions)
        if self.server:
            with self._engine():
                for field, schema in PAYLOAD_INDEXES.items():
                    self._client.create_payload_index(name, field, field_schema=schema, wait=True)
        return created

    def drop_collection(self, name: str) -> None:
        with self._engine():
            self._client.delete_collection(name)

    def upsert_batch(
        self, collection: str, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict]
    ) -> None:
        batch = models.Batch(ids=list(ids), vectors=np.asarray(vectors).tolist(), payloads=list(payloads))
        with self._engine():
            self._client.upsert(collection, points=batch, wait=True)

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict],
        batch_size: int = 2048,
    ) -> int:
        """On a server, `layout.write_parallelism` batches in flight at once (the requests wait on
        the network, not on this process); a failure says how many points were written."""
        parallelism = self.layout.write_parallelism if self.server else 1
        if parallelism <= 1:
            return super().upsert(collection, ids, vectors, payloads, batch_size)
        check_point_counts(ids, vectors, payloads)
        starts = iter(range(0, len(ids), batch_size))
        written, failure = 0, None
        with ThreadPoolExecutor(max_workers=parallelism) as pool:
            in_flight: dict[Future, int] = {}

            def send(count: int) -> None:
                for start in islice(starts, count):
                    stop = start + batch_size
                    batch = pool.submit(
                        self.upsert_batch,
                        collection,
                        ids[start:stop],
                        vectors[start:stop],
                        payloads[start:stop],
                    )
                    in_flight[batch] = len(ids[start:stop])

            # At most `parallelism` batches are out at once, and none is sent after a failure.
            send(parallelism)
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for batch in done:
                    size = in_flight.pop(batch)
                    try:
                        batch.result()
                        written += size
                    except VectorIndexError as exc:
                        failure = failure or exc
                if failure is None:
                    send(len(done))
        if failure is not None:
            raise self.partial_write(collection, written, len(ids), failure)
        return len(ids)

    def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        with self._engine():
            self._client.set_payload(collection, payload=dict(payload), points=list(ids), wait=True)

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        if ids:
            with self._engine():
                self._client.delete(
                    collection, points_selector=models.PointIdsList(points=list(ids)), wait=True
                )
        return len(ids)

    def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        with self._engine():
            records = self._client.retrieve(
                collection, list(ids), with_payload=True, with_vectors=with_vectors
            )
        return [_point(r, with_vectors) for r in records]

    def scroll(self, collection: str, with_vectors: bool = False, page: int = 1000) -> Iterator[StoredPoint]:
        offset = None
        while True:
            with self._engine():
                records, offset = self._client.scroll(
                    collection, limit=page, offset=offset, with_payload=True, with_vectors=with_vectors
                )
            yield from (_point(r, with_vectors) for r in records)
            if offset is None:
                return

    def count(self, collection: str) -> int:
        with self._engine():
            return self._client.count(collection, exact=True).count

    def aliases(self) -> dict[str, str]:
        with self._engine():
            return {a.alias_name: a.collection_name for a in self._client.get_aliases().aliases}

    def swap_alias(self, alias: str, collection: str) -> str | None:
        previous = self.alias_target(alias)
        if previous == collection:
            return previous
        if self.dimensions(collection) is None:
            raise VectorIndexError(f"vector index at {self.location}: no collection {collection} for {alias}")
        operations: list = []
        if previous is not None:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        with self._engine():
            self._client.update_collection_aliases(change_aliases_operations=operations)
        return previous

    def recommend(
        self,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str] = (),
        limit: int = 10,
        exclude: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[Hit]:
        if not positive:
            raise ValueError("recommend needs at least one positive example")
        conditions = [
            models.FieldCondition(key=key, match=models.MatchAny(any=list(values)))
            for key, values in (exclude or {}).items()
            if len(values)
        ]
        query = models.RecommendQuery(
            recommend=models.RecommendInput(
                positive=list(positive),
                negative=list(negative) or None,
                strategy=models.RecommendStrategy.AVERAGE_VECTOR,
            )
        )
        with self._engine():
            hits = self._client.query_points(
                collection,
                query=query,
                query_filter=models.Filter(must_not=conditions) if conditions else None,
                limit=limit,
                with_payload=True,
            ).points
        return [Hit(str(h.id), float(h.score), h.payload or {}) for h in hits]


def _point(record: models.Record, with_vectors: bool) -> StoredPoint:
    vector = list(record.vector) if with_vectors and record.vector is not None else None
    return StoredPoint(str(record.id), record.payload or {}, vector)
