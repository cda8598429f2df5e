"""What the embedded Qdrant Edge store adds to Edge itself: collections and aliases as folders and
a file, changed so that a crash leaves the old state or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from persona_pipeline.resources.vector_index import VectorIndex
from persona_pipeline_tests.test_vector_store_contract import COLLECTION, IDS, VECTORS, payload

pytestmark = pytest.mark.store_agnostic


@pytest.fixture
def filled(tmp_path: Path) -> VectorIndex:
    index = VectorIndex(path=str(tmp_path / "index"), embedded_engine="edge")
    with index.open() as store:
        store.ensure_collection(COLLECTION, VECTORS.shape[1])
        store.upsert(COLLECTION, IDS, VECTORS, [payload(i) for i in range(len(IDS))])
    return index


def test_edge_replaces_the_alias_file_whole_or_not_at_all(filled, monkeypatch):
    with filled.open() as store:
        store.swap_alias("personas", COLLECTION)
        store.ensure_collection("personas_space-w2", VECTORS.shape[1])

        def crash(*_args):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            store.swap_alias("personas", "personas_space-w2")
        monkeypatch.undo()
        assert store.alias_target("personas") == COLLECTION
    with filled.open() as store:
        assert store.aliases() == {"personas": COLLECTION}
    assert [p.name for p in Path(filled.path).iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_edge_forgets_a_collection_whose_creation_was_interrupted(filled):
    half_made = Path(filled.path) / "collections" / ".new-0123"
    (half_made / "segments").mkdir(parents=True)
    with filled.open() as store:
        assert store.collections() == [COLLECTION]
    assert not half_made.exists()
