"""The vector index: a Qdrant server or cluster (`QDRANT_URL`), or embedded at a local path.

Embedded, it runs on Qdrant Edge by default (`embedded_engine="edge"`); `"local"` keeps
qdrant-client's local mode, much slower to write (benchmarks/vector_index_write.py). Either way
the pipeline sees one `VectorStore` (resources/vector_stores/base.py), never a raw client.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
from pydantic import Field, field_validator

from persona_pipeline import settings
from persona_pipeline.resources.vector_stores.base import Hit, StoredPoint, VectorIndexError, VectorStore
from persona_pipeline.resources.vector_stores.qdrant_edge_store import QdrantEdgeStore
from persona_pipeline.secrets import mask_url

__all__ = [
    "COLLECTION_PREFIX",
    "EMBEDDED_ENGINES",
    "Hit",
    "StoredPoint",
    "VectorIndex",
    "VectorIndexError",
    "VectorStore",
    "persona_collections",
    "point_id",
    "point_ids",
]

POINT_NAMESPACE = uuid.UUID("6f1d3c0e-5b7a-4c1e-9a43-2f0d8e6b7c51")
COLLECTION_PREFIX = "personas_"
# The Dagster pool of every step that writes the vector index: one writer at a time.
VECTOR_INDEX_POOL = "vector_index"
EMBEDDED_ENGINES = ("edge", "local")


def point_id(device_id: str) -> str:
    """Point id of a device: uuid5 of its id, so re-runs overwrite instead of duplicating."""
    return str(uuid.uuid5(POINT_NAMESPACE, device_id))


# Where the four dashes go in the 36 characters of a UUID's text.
_UUID_TEXT_POSITIONS = np.r_[0:8, 9:13, 14:18, 19:23, 24:36]


def point_ids(device_ids: Iterable[str]) -> list[str]:
    """`point_id` of many devices: the same uuid5 texts, about 5x faster. One SHA-1 per device
    (hashlib has no batch call); the version and variant bits and the text are done for all at once."""
    prefix = POINT_NAMESPACE.bytes
    digests = b"".join([hashlib.sha1(prefix + d.encode()).digest()[:16] for d in device_ids])
    raw = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 16).copy()
    if len(raw) == 0:
        return []
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hex_digits = np.frombuffer(raw.tobytes().hex().encode(), dtype=np.uint8).reshape(-1, 32)
    text = np.full((len(raw), 36), ord("-"), dtype=np.uint8)
    text[:, _UUID_TEXT_POSITIONS] = hex_digits
    return text.view("S36").ravel().astype(str).tolist()


def persona_collections(store: VectorStore) -> list[str]:
    return [name for name in store.collections() if name.startswith(COLLECTION_PREFIX)]


def embedded_layout(path: Path) -> str | None:
    """Which embedded engine wrote the folder: "edge", "local" (qdrant-client) or None (empty)."""
    if (path / "meta.json").is_file() or (path / "collection").is_dir():
        return "local"
    if (path / "aliases.json").is_file() or (path / "collections").is_dir():
        return "edge"
    return None


class VectorIndex(dg.ConfigurableResource):
    """Persona vectors in Qdrant: one collection per feature space, behind the alias `personas`."""

    url: str | None = Field(default=None, description="Qdrant server URL (QDRANT_URL). Empty: embedded.")
    api_key: str | None = Field(default=None, description="Qdrant API key (QDRANT_API_KEY). Never logged.")
    path: str | None = Field(
        default=None,
        description="Folder of the embedded index. Default: $PERSONA_HOME/qdrant.",
    )
    embedded_engine: str = Field(
        default="edge",
        description="Engine of the embedded index (PERSONA_QDRANT_ENGINE): `edge`, Qdrant Edge in "
        "process (default), or `local`, qdrant-client's local mode. Not used with a url.",
    )
    alias: str = Field(default="personas", description="Alias that always names the current collection.")
    timeout_seconds: int = Field(
        default=30, ge=1, le=3_600, description="Timeout of each request to a Qdrant server."
    )
    shards: int = Field(
        default=1,
        ge=settings.QDRANT_LIMITS["shards"][0],
        le=settings.QDRANT_LIMITS["shards"][1],
        description="Shards of a new collection on a Qdrant server or cluster (PERSONA_QDRANT_SHARDS); "
        "Qdrant spreads them over the cluster's nodes. Not used embedded.",
    )
    replicas: int = Field(
        default=1,
        ge=settings.QDRANT_LIMITS["replicas"][0],
        le=settings.QDRANT_LIMITS["replicas"][1],
        description="Copies of each shard on a cluster (PERSONA_QDRANT_REPLICAS): 2 keeps the index "
        "readable and writable while one node is down. Not used embedded.",
    )
    vectors_on_disk: bool = Field(
        default=False,
        description="Keep a new collection's original vectors on disk, memory-mapped "
        "(PERSONA_QDRANT_VECTORS_ON_DISK); with quantization the search reads the RAM copy first. "
        "Not used embedded.",
    )
    quantization: Literal["none", "scalar"] = Field(
        default="none",
        description="`scalar`: a new collection keeps int8 copies of its vectors in RAM, a quarter "
        "of their float32 size (PERSONA_QDRANT_QUANTIZATION). Not used embedded.",
    )
    write_parallelism: int = Field(
        default=4,
        ge=settings.QDRANT_LIMITS["write_parallelism"][0],
        le=settings.QDRANT_LIMITS["write_parallelism"][1],
        description="Batches of points in flight at once when writing to a server "
        "(PERSONA_QDRANT_WRITE_PARALLELISM). Embedded writes are one batch at a time.",
    )

    @field_validator("embedded_engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in EMBEDDED_ENGINES:
            raise ValueError(f"embedded_engine {value!r}: expected one of {', '.join(EMBEDDED_ENGINES)}")
        return value

    @property
    def location(self) -> str:
        """Where the index lives, for logs and metadata: never the API key, nor the URL's credentials."""
        return mask_url(self.url) if self.url else f"embedded:{self.resolved_path}"

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
            from persona_pipeline.resources.vector_stores.qdrant_client_store import ServerLayout

            layout = ServerLayout(
                shards=self.shards,
                replicas=self.replicas,
                vectors_on_disk=self.vectors_on_disk,
                quantization=self.quantization,
                write_parallelism=self.write_parallelism,
            )
            return _client_store(
                self.location, url=self.url, api_key=self.api_key, timeout=self.timeout_seconds, layout=layout
            )
        path = Path(self.resolved_path)
        found = embedded_layout(path)
        if found is not None and found != self.embedded_engine:
            raise VectorIndexError(
                f"the vector index at {self.location} was written by the embedded engine `{found}`, "
                f"not `{self.embedded_engine}`: set PERSONA_QDRANT_ENGINE={found}, or move the folder "
                "away and materialize persona_index to fill a new one from the persona store"
            )
        if self.embedded_engine == "local":
            return _client_store(self.location, path=str(path))
        return QdrantEdgeStore(path, self.location)


def _client_store(location: str, **connection) -> VectorStore:
    # Imported on use: qdrant-client takes most of a second to import, and Edge does without it.
    from persona_pipeline.resources.vector_stores.qdrant_client_store import QdrantClientStore

    return QdrantClientStore(location, **connection)
