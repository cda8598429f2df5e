"""What the pipeline asks of a vector index, whatever engine holds it."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from persona_pipeline.secrets import mask_url

# Collection and alias names become folder names in the embedded engine.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


class VectorIndexError(RuntimeError):
    """The vector index could not be reached or refused an operation.

    `detail` is the engine's own message, without the index's location. Both have any credentials
    of a URL masked: an engine's message may quote the URL it was given."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(mask_url(message))
        self.detail = mask_url(detail if detail is not None else message)


@dataclass(frozen=True)
class StoredPoint:
    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise VectorIndexError(
            f"{name!r} is not a valid collection or alias name: letters, digits, '_', '.', '-'"
        )
    return name


def check_point_counts(ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
    """One vector and one payload per id, or a ValueError saying how many of each."""
    if not len(ids) == len(vectors) == len(payloads):
        raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors and {len(payloads)} payloads")


class VectorStore(ABC):
    """An open session on a vector index: collections of points (id, vector, payload) with
    Euclidean distance, aliases that name a collection, and Qdrant's recommendation query.

    Point ids are UUID strings. Wherever a collection is named, an alias may stand for it.
    Every failure of the engine is raised as `VectorIndexError`."""

    location: str

    @abstractmethod
    def close(self) -> None: ...

    # Collections
    @abstractmethod
    def collections(self) -> list[str]:
        """Names of every collection, sorted."""

    @abstractmethod
    def dimensions(self, collection: str) -> int | None:
        """The vector size of the collection; None when there is no such collection."""

    @abstractmethod
    def create_collection(self, name: str, dimensions: int) -> None: ...

    @abstractmethod
    def drop_collection(self, name: str) -> None:
        """Drop the collection and every alias naming it."""

    def ensure_collection(self, name: str, dimensions: int) -> bool:
        """Create the collection if it is missing; True when it was created."""
        size = self.dimensions(name)
        if size is None:
            self.create_collection(name, dimensions)
            return True
        if size != dimensions:
            raise VectorIndexError(
                f"collection {name} has {size} dimensions, the feature space has {dimensions}"
            )
        return False

    # Points
    @abstractmethod
    def upsert_batch(
        self, collection: str, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict]
    ) -> None:
        """Write one batch of points; a point with an existing id is replaced, payload included."""

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict],
        batch_size: int = 2048,
    ) -> int:
        """Write the points in batches of `batch_size`; a failure says how many were written."""
        check_point_counts(ids, vectors, payloads)
        for start in range(0, len(ids), batch_size):
            stop = start + batch_size
            try:
                self.upsert_batch(collection, ids[start:stop], vectors[start:stop], payloads[start:stop])
            except VectorIndexError as exc:
                raise self.partial_write(collection, start, len(ids), exc) from None
        return len(ids)

    def partial_write(
        self, collection: str, written: int, total: int, exc: VectorIndexError
    ) -> VectorIndexError:
        """The error of a write that stopped after `written` of `total` points landed."""
        return VectorIndexError(
            f"vector index at {self.location} failed after {written} of {total} points were written "
            f"to {collection}: {exc.detail}",
            detail=exc.detail,
        )

    @abstractmethod
    def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Set these payload fields on the points, keeping their other fields."""

    def set_payload_values(
        self, collection: str, field: str, ids_by_value: Mapping[Any, Sequence[str]], chunk: int = 10_000
    ) -> int:
        """Set `field` to each value on its points: one request per value and chunk, not per point."""
        written = 0
        for value, ids in ids_by_value.items():
            for start in range(0, len(ids), chunk):
                part = list(ids[start : start + chunk])
                self.set_payload(collection, part, {field: value})
                written += len(part)
        return written

    @abstractmethod
    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Delete the points (ids that are not there are no error); returns len(ids)."""

    @abstractmethod
    def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        """The points among `ids` that exist, in no particular order."""

    @abstractmethod
    def scroll(self, collection: str, with_vectors: bool = False, page: int = 1000) -> Iterator[StoredPoint]:
        """Every point of the collection."""

    @abstractmethod
    def count(self, collection: str) -> int: ...

    # Aliases
    @abstractmethod
    def aliases(self) -> dict[str, str]:
        """Alias name -> collection name."""

    def alias_target(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    @abstractmethod
    def swap_alias(self, alias: str, collection: str) -> str | None:
        """Point the alias at `collection` in one atomic change; returns the previous target.
        A collection that does not exist is refused and leaves the alias as it was."""

    # Queries
    @abstractmethod
    def recommend(
        self,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str] = (),
        limit: int = 10,
        exclude: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[Hit]:
        """Qdrant's recommendation query with its default strategy `average_vector`: the points
        nearest to avg(positive) + (avg(positive) - avg(negative)), nearest first (score = the
        Euclidean distance). The examples are point ids; they never come back themselves, and
        neither do points whose payload field has one of the values in `exclude[field]`."""


def recommendation_vector(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Qdrant's `average_vector` strategy: avg_pos + (avg_pos - avg_neg), or avg_pos alone."""
    average = positive.mean(axis=0)
    if len(negative) == 0:
        return average
    return 2 * average - negative.mean(axis=0)
