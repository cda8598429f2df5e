"""Whether a persona collection holds what the persona store says it does. Pure (no Dagster).

A damaged embedded index can open and answer with fewer points (a truncated id tracker) or fail
only when a vector is read (a truncated vector file): the count alone or the state table alone
would trust it. So a collection is checked by its point count against the devices and by a sample
of devices read back with their vectors and compared with persona_vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persona_pipeline.resources.vector_index import VectorIndexError, VectorStore, point_ids

SAMPLE_SIZE = 64


@dataclass(frozen=True)
class CollectionProblem:
    """What is wrong with a collection. `unreadable` and `extra` need the collection rebuilt;
    `missing` and `differs` are mended by rewriting its points."""

    kind: str  # "unreadable" | "missing" | "extra" | "differs"
    description: str

    @property
    def needs_rebuild(self) -> bool:
        return self.kind in ("unreadable", "extra")


def collection_problem(
    index: VectorStore,
    collection: str,
    devices: int,
    sample_device_ids: list[str],
    sample_vectors: np.ndarray,
) -> CollectionProblem | None:
    """None when `collection` holds `devices` points and each sampled device's point is there with
    its vector; otherwise what is wrong, in one line."""
    try:
        points = index.count(collection)
        if points < devices:
            return CollectionProblem("missing", f"{collection} holds {points} points for {devices} devices")
        if points > devices:
            return CollectionProblem("extra", f"{collection} holds {points} points for {devices} devices")
        found = index.retrieve(collection, point_ids(sample_device_ids), with_vectors=True)
    except VectorIndexError as exc:
        return CollectionProblem("unreadable", f"{collection} cannot be read: {exc.detail}")
    by_id = {point.id: point for point in found}  # at most SAMPLE_SIZE points
    expected_ids = point_ids(sample_device_ids)
    absent = [device for device, pid in zip(sample_device_ids, expected_ids, strict=True) if pid not in by_id]
    if absent:
        return CollectionProblem(
            "missing",
            f"{len(absent)} of {len(sample_device_ids)} sampled devices have no point in {collection} "
            f"(first: {absent[0]})",
        )
    dimensions = sample_vectors.shape[1] if sample_vectors.ndim == 2 else 0
    vectors = [by_id[pid].vector or [] for pid in expected_ids]
    if any(len(vector) != dimensions for vector in vectors):
        return CollectionProblem(
            "unreadable", f"{collection} returns vectors of another size than {dimensions}"
        )
    read = np.asarray(vectors, dtype=np.float32).reshape(len(expected_ids), dimensions)
    differs = ~np.isclose(read, sample_vectors, rtol=1e-6, atol=1e-6).all(axis=1)
    if differs.any():
        first = sample_device_ids[int(np.flatnonzero(differs)[0])]
        return CollectionProblem(
            "differs",
            f"{int(differs.sum())} of {len(sample_device_ids)} sampled points in {collection} hold "
            f"another vector than persona_vectors (first: {first})",
        )
    return None
