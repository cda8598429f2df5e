"""The vector index: a Qdrant server or cluster (`QDRANT_URL`), or embedded at a local path.

The pipeline sees one `VectorStore` (resources/vector_stores/base.py), never a raw client.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from persona_pipeline import settings
from persona_pipeline.resources.vector_stores.base import Hit, StoredPoint, VectorIndexError, VectorStore
from persona_pipeline.resources.vector_stores.qdrant_client_store import QdrantClientStore

__all__ = [
    "COLLECTION_PREFIX",
    "Hit",
    "StoredPoint",
    "VectorIndex",
    "VectorIndexError",
    "VectorStore",
    "persona_collections",
    "point_id",
]

POINT_NAMESPACE = uuid.UUID("6f1d3c0e-5b7a-4c1e-9a43-2f0d8e6b7c51")
COLLECTION_PREFIX = "personas_"


def point_id(device_id: str) -> str:
    """Point id of a device: uuid5 of its id, so re-runs overwrite instead of duplicating."""
    return str(uuid.uuid5(POINT_NAMESPACE, device_id))


def persona_collections(store: VectorStore) -> list[str]:
    return [name for name in store.collections() if name.startswith(COLLECTION_PREFIX)]


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
    def open(self) -> Iterator[VectorStore]:
        """A session on the index for the duration of the block. The embedded index admits one
        process at a time (the assets that use it share the concurrency pool `vector_index`)."""
        store = self._connect()
        try:
            yield store
        finally:
            store.close()

    def _connect(self) -> VectorStore:
        if self.url:
            return QdrantClientStore(
                self.location, url=self.url, api_key=self.api_key, timeout=self.timeout_seconds
            )
        return QdrantClientStore(self.location, path=self.resolved_path)
