"""The VectorStore interface, the same tests on every embedded engine: Qdrant Edge (the default)
and qdrant-client's local mode (the client code that also talks to a Qdrant server)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from persona_pipeline.resources.vector_index import VectorIndex, VectorIndexError, point_id
from persona_pipeline_tests.conftest import ENGINES

pytestmark = [pytest.mark.store_agnostic, pytest.mark.parametrize("embedded_engine", ENGINES)]

COLLECTION = "personas_space-w1"
DEVICES = [f"d{i}" for i in range(40)]
IDS = [point_id(d) for d in DEVICES]
VECTORS = np.random.default_rng(3).random((len(DEVICES), 4), dtype=np.float32)


def payload(i: int, **extra) -> dict:
    return {"device_id": DEVICES[i], "customer_id": f"c{i // 2}", "cluster_id": None, **extra}


@pytest.fixture
def index(tmp_path: Path, embedded_engine: str) -> VectorIndex:
    return VectorIndex(path=str(tmp_path / "index"), embedded_engine=embedded_engine)


@pytest.fixture
def filled(index: VectorIndex) -> VectorIndex:
    with index.open() as store:
        store.ensure_collection(COLLECTION, VECTORS.shape[1])
        store.upsert(COLLECTION, IDS, VECTORS, [payload(i) for i in range(len(IDS))], batch_size=7)
    return index


def test_a_collection_is_created_once_and_refuses_other_dimensions(index):
    with index.open() as store:
        assert store.collections() == []
        assert store.dimensions(COLLECTION) is None
        assert store.ensure_collection(COLLECTION, 4) is True
        assert store.ensure_collection(COLLECTION, 4) is False
        with pytest.raises(VectorIndexError, match=f"collection {COLLECTION} has 4 dimensions.* has 5"):
            store.ensure_collection(COLLECTION, 5)
        assert store.collections() == [COLLECTION]
        assert store.count(COLLECTION) == 0


def test_points_keep_their_ids_vectors_and_payloads_across_batches(filled):
    with filled.open() as store:
        assert store.count(COLLECTION) == len(IDS)
        points = {p.id: p for p in store.scroll(COLLECTION, with_vectors=True, page=9)}
    assert sorted(points) == sorted(IDS)
    for i, point_key in enumerate(IDS):
        assert points[point_key].payload == payload(i)
        np.testing.assert_allclose(points[point_key].vector, VECTORS[i], rtol=1e-6)


def test_writing_an_id_again_replaces_the_point_payload_included(filled):
    with filled.open() as store:
        store.upsert(COLLECTION, IDS[:2], VECTORS[[5, 6]], [{"device_id": "new"}, payload(1, cluster_id=4)])
        assert store.count(COLLECTION) == len(IDS)
        first, second = sorted(
            store.retrieve(COLLECTION, IDS[:2], with_vectors=True), key=lambda p: IDS.index(p.id)
        )
    assert first.payload == {"device_id": "new"}  # customer_id and cluster_id went with the old point
    np.testing.assert_allclose(first.vector, VECTORS[5], rtol=1e-6)
    assert second.payload == payload(1, cluster_id=4)


def test_payload_values_are_set_on_the_named_points_only(filled):
    with filled.open() as store:
        written = store.set_payload_values(COLLECTION, "cluster_id", {3: IDS[:5], 7: IDS[5:8]}, chunk=2)
        points = {p.id: p.payload for p in store.scroll(COLLECTION)}
    assert written == 8
    assert [points[i]["cluster_id"] for i in IDS[:9]] == [3] * 5 + [7] * 3 + [None]
    assert all(points[i]["device_id"] == DEVICES[n] for n, i in enumerate(IDS))  # other fields kept


def test_delete_removes_the_points_and_ids_that_are_not_there_are_no_error(filled):
    with filled.open() as store:
        assert store.delete(COLLECTION, [IDS[0], IDS[1], point_id("never-written")]) == 3
        assert store.delete(COLLECTION, []) == 0
        assert store.count(COLLECTION) == len(IDS) - 2
        assert store.retrieve(COLLECTION, IDS[:3])[0].id == IDS[2]
        assert len(store.retrieve(COLLECTION, IDS[:3])) == 1


def test_points_payloads_collections_and_aliases_persist_after_close(filled):
    with filled.open() as store:
        store.set_payload(COLLECTION, IDS[:1], {"cluster_id": 9})
        store.delete(COLLECTION, IDS[-1:])
        store.swap_alias("personas", COLLECTION)
    with filled.open() as store:
        assert store.collections() == [COLLECTION]
        assert store.aliases() == {"personas": COLLECTION}
        assert store.count("personas") == len(IDS) - 1
        (point,) = store.retrieve("personas", IDS[:1], with_vectors=True)
    assert point.payload == payload(0, cluster_id=9)
    np.testing.assert_allclose(point.vector, VECTORS[0], rtol=1e-6)


def test_the_alias_moves_to_a_new_collection_in_one_swap(filled):
    second = "personas_space-w2"
    with filled.open() as store:
        assert store.alias_target("personas") is None
        assert store.swap_alias("personas", COLLECTION) is None
        store.ensure_collection(second, VECTORS.shape[1])
        store.upsert(second, IDS[:3], VECTORS[:3], [payload(i) for i in range(3)])
        assert store.count("personas") == len(IDS)  # readers still see the complete collection

        assert store.swap_alias("personas", second) == COLLECTION
        assert store.swap_alias("personas", second) == second  # already there: nothing to do
        assert store.count("personas") == 3
        with pytest.raises(VectorIndexError):
            store.swap_alias("personas", "personas_missing-w3")
        assert store.alias_target("personas") == second  # a refused swap changes nothing
    with filled.open() as store:
        assert store.aliases() == {"personas": second}


def test_dropping_a_collection_drops_the_aliases_that_name_it(filled):
    with filled.open() as store:
        store.swap_alias("personas", COLLECTION)
        store.drop_collection(COLLECTION)
        assert store.collections() == []
        assert store.aliases() == {}
        with pytest.raises(VectorIndexError):
            store.count(COLLECTION)
    with filled.open() as store:
        assert store.collections() == [] and store.aliases() == {}


def expected_recommendation(positive: list[int], negative: list[int], skip: set[int], limit: int):
    """Qdrant's average_vector strategy, by brute force: nearest to 2 avg(pos) - avg(neg)."""
    query = VECTORS[positive].mean(axis=0)
    if negative:
        query = 2 * query - VECTORS[negative].mean(axis=0)
    distances = np.linalg.norm(VECTORS - query, axis=1)
    order = [i for i in np.argsort(distances) if i not in skip and i not in positive and i not in negative]
    return [DEVICES[i] for i in order[:limit]], distances[order[:limit]]


def test_recommend_returns_the_nearest_points_to_the_positive_and_away_from_the_negative(filled):
    positive, negative, offered = [0, 1, 2], [3, 4], [10, 11, 12, 13]
    with filled.open() as store:
        store.swap_alias("personas", COLLECTION)
        hits = store.recommend(
            "personas",
            [IDS[i] for i in positive],
            [IDS[i] for i in negative],
            limit=6,
            exclude={"device_id": [DEVICES[i] for i in offered]},
        )
        only_positive = store.recommend(COLLECTION, [IDS[5]], limit=3)
    devices, distances = expected_recommendation(positive, negative, set(offered), 6)
    assert [h.payload["device_id"] for h in hits] == devices
    assert [h.id for h in hits] == [point_id(d) for d in devices]
    np.testing.assert_allclose([h.score for h in hits], distances, rtol=1e-4)  # Euclidean distance
    assert [h.payload["device_id"] for h in only_positive] == expected_recommendation([5], [], set(), 3)[0]


def test_recommend_with_an_example_that_is_not_in_the_collection_fails(filled):
    with filled.open() as store, pytest.raises(VectorIndexError):
        store.recommend(COLLECTION, [point_id("never-written")], limit=3)


def test_operations_on_a_missing_collection_fail_as_vector_index_errors(index):
    with index.open() as store:
        for operation in (
            lambda: store.count("personas_missing-w1"),
            lambda: store.upsert("personas_missing-w1", IDS[:1], VECTORS[:1], [payload(0)]),
            lambda: store.retrieve("personas_missing-w1", IDS[:1]),
        ):
            with pytest.raises(VectorIndexError):
                operation()


def test_a_second_session_is_refused_while_the_first_is_open(filled):
    with filled.open() as store:
        with pytest.raises(VectorIndexError, match=re.escape(filled.location)), filled.open():
            pass
        assert store.count(COLLECTION) == len(IDS)
    with filled.open() as store:  # closing released the folder
        assert store.count(COLLECTION) == len(IDS)


def test_a_folder_written_by_the_other_engine_is_refused_with_what_to_do(filled, embedded_engine):
    other = next(e for e in ENGINES if e != embedded_engine)
    refused = pytest.raises(VectorIndexError, match=f"PERSONA_QDRANT_ENGINE={embedded_engine}")
    with refused, VectorIndex(path=filled.path, embedded_engine=other).open():
        pass
