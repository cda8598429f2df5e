"""The vector index: Qdrant, a server or cluster (`QDRANT_URL`) or a local path (embedded default)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dagster as dg
import numpy as np
from pydantic import Field
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from persona_pipeline import settings

POINT_NAMESPACE = uuid.UUID("6f1d3c0e-5b7a-4c1e-9a43-2f0d8e6b7c51")
COLLECTION_PREFIX = "personas_"


def point_id(device_id: str) -> str:
    """Point id of a device: uuid5 of its id, so re-runs overwrite instead of duplicating."""
    return str(uuid.uuid5(POINT_NAMESPACE, device_id))


class VectorIndexError(RuntimeError):
    """The vector index could not be reached or refused an operation."""


class VectorIndex(dg.ConfigurableResource):
    """Persona vectors in Qdrant: one collection per feature space, behind the alias `personas`."""

    url: str | None = Field(default=None, description="Qdrant server URL (QDRANT_URL). Empty: embedded.")
    api_key: str | None = Field(default=None, description="Qdrant API key (QDRANT_API_KEY). Never logged.")
    path: str | None = Field(
        default=None,
        description="Local Qdrant folder for the embedded mode. Default: $PERSONA_HOME/qdrant.",
    )
    alias: str = Field(default="personas", description="Alias that always names the current collection.")
    timeout_seconds: int = Field(default=30, description="Timeout of each request to a Qdrant server.")

    @property
    def location(self) -> str:
        """Where the index lives, for logs and metadata (never includes the API key)."""
        return self.url or f"embedded:{self.resolved_path}"

    @property
    def resolved_path(self) -> str:
        return self.path or str(settings.qdrant_path())

    @contextmanager
    def client(self) -> Iterator[QdrantClient]:
        """A client for the duration of the block. The embedded path admits one process at a time."""
        try:
            if self.url:
                client = QdrantClient(url=self.url, api_key=self.api_key, timeout=self.timeout_seconds)
            else:
                client = QdrantClient(path=self.resolved_path)
        except Exception as exc:
            raise VectorIndexError(f"cannot open the vector index at {self.location}: {exc}") from None
        try:
            yield client
        except (ResponseHandlingException, UnexpectedResponse) as exc:
            raise VectorIndexError(f"vector index at {self.location} failed: {exc}") from None
        finally:
            client.close()

    def alias_target(self, client: QdrantClient) -> str | None:
        for alias in client.get_aliases().aliases:
            if alias.alias_name == self.alias:
                return alias.collection_name
        return None

    @staticmethod
    def ensure_collection(client: QdrantClient, name: str, dimensions: int) -> bool:
        """Create the collection if it is missing; True when it was created."""
        if client.collection_exists(name):
            size = client.get_collection(name).config.params.vectors.size
            if size != dimensions:
                raise VectorIndexError(
                    f"collection {name} has {size} dimensions, the feature space has {dimensions}"
                )
            return False
        client.create_collection(
            name,
            vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.EUCLID),
        )
        return True

    def upsert(
        self,
        client: QdrantClient,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict],
        batch_size: int,
    ) -> int:
        for start in range(0, len(ids), batch_size):
            stop = start + batch_size
            try:
                client.upsert(
                    collection,
                    points=models.Batch(
                        ids=list(ids[start:stop]),
                        vectors=vectors[start:stop].tolist(),
                        payloads=list(payloads[start:stop]),
                    ),
                    wait=True,
                )
            except (ResponseHandlingException, UnexpectedResponse) as exc:
                raise VectorIndexError(
                    f"vector index at {self.location} failed after {start} of {len(ids)} points "
                    f"were written to {collection}: {exc}"
                ) from None
        return len(ids)

    @staticmethod
    def set_payload_values(
        client: QdrantClient, collection: str, field: str, ids_by_value: dict[object, Sequence[str]]
    ) -> int:
        """Set `field` to each value on its points: one request per value, not per point."""
        written = 0
        for value, ids in ids_by_value.items():
            for start in range(0, len(ids), 10_000):
                chunk = list(ids[start : start + 10_000])
                client.set_payload(collection, payload={field: value}, points=chunk, wait=True)
                written += len(chunk)
        return written

    @staticmethod
    def recommend_devices(
        client: QdrantClient,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str],
        exclude_devices: Sequence[str],
        limit: int,
    ) -> list[tuple[str, float]]:
        """Qdrant's recommendation query: the devices nearest to the positive examples and away
        from the negative ones (point ids), skipping `exclude_devices`; (device_id, score) pairs."""
        exclude = models.Filter(
            must_not=[
                models.FieldCondition(key="device_id", match=models.MatchAny(any=list(exclude_devices)))
            ]
        )
        hits = client.query_points(
            collection,
            query=models.RecommendQuery(
                recommend=models.RecommendInput(positive=list(positive), negative=list(negative) or None)
            ),
            query_filter=exclude if exclude_devices else None,
            limit=limit,
            with_payload=["device_id"],
        ).points
        return [(hit.payload["device_id"], float(hit.score)) for hit in hits]

    @staticmethod
    def delete(client: QdrantClient, collection: str, ids: Sequence[str]) -> int:
        if ids:
            client.delete(collection, points_selector=models.PointIdsList(points=list(ids)), wait=True)
        return len(ids)

    def swap_alias(self, client: QdrantClient, collection: str) -> str | None:
        """Point the alias at `collection` in one atomic operation; returns the previous target."""
        previous = self.alias_target(client)
        if previous == collection:
            return previous
        operations: list = []
        if previous is not None:
            operations.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.alias))
            )
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=self.alias)
            )
        )
        client.update_collection_aliases(change_aliases_operations=operations)
        return previous

    @staticmethod
    def persona_collections(client: QdrantClient) -> list[str]:
        return sorted(
            c.name for c in client.get_collections().collections if c.name.startswith(COLLECTION_PREFIX)
        )
