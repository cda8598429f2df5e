"""A damaged embedded index is not trusted: persona_index verifies the collection it relies on
(its point count against the devices, a sample of points read back with their vectors), rewrites
what is missing or rebuilds the collection it cannot read, says so in its metadata, and fails its
ERROR check when the count still disagrees. The damage is real: Edge's files truncated or deleted."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from persona_pipeline.feedback.assets import key_weights
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.personas import storage
from persona_pipeline.personas.assets import ONE_POINT_CHECK, device_profiles, persona_index, persona_vectors
from persona_pipeline.resources import VectorIndex
from persona_pipeline.resources.vector_index import VectorIndexError, VectorStore, point_id
from persona_pipeline_tests.conftest import update, write_jsonl

# key_weights records the configured weights the vectors are built with.
VECTOR_ASSETS = [key_weights, persona_vectors, persona_index]

DAY = "2026-03-01"
DEVICES = [f"d{i:04d}" for i in range(1500)]
CITIES = ["Berlin", "Paris", "Rome", "Oslo"]


def index_fleet(landing, resources, instance) -> dg.ExecuteInProcessResult:
    rows = [
        update(d, "device.location.city", CITIES[i % 4], f"{DAY}T10:00:00Z") for i, d in enumerate(DEVICES)
    ]
    rows += [
        update(d, "device.usage.app_maps_duration", 60 * i, f"{DAY}T11:00:00Z") for i, d in enumerate(DEVICES)
    ]
    write_jsonl(landing, DAY, rows)
    assert dg.materialize(
        [index_updates, device_profiles], resources=resources, instance=instance, partition_key=DAY
    ).success
    return dg.materialize(VECTOR_ASSETS, resources=resources, instance=instance)


def collection_folder(resources) -> Path:
    (folder,) = (Path(resources["vector_index"].resolved_path) / "collections").iterdir()
    return folder


def segment_file(resources, name: str) -> Path:
    (found,) = collection_folder(resources).glob(f"segments/*/{name}")
    return found


def damage(resources, how: str) -> None:
    if how == "truncated id mappings":
        os.truncate(segment_file(resources, "mutable_id_tracker.mappings"), 100)
    elif how == "truncated vectors":
        os.truncate(segment_file(resources, "vector_storage/vectors/chunk_0.mmap"), 0)
    elif how == "deleted vectors":
        segment_file(resources, "vector_storage/vectors/chunk_0.mmap").unlink()
    elif how == "deleted segment":
        shutil.rmtree(segment_file(resources, "segment.json").parent)
    elif how == "deleted collection config":
        (collection_folder(resources) / "edge_config.json").unlink()
    elif how == "deleted collection":
        shutil.rmtree(collection_folder(resources))
    else:
        raise AssertionError(how)


def assert_every_point_is_back(resources) -> None:
    stored = storage.read_stored_vectors(resources["persona_store"])
    index = resources["vector_index"]
    with index.open() as store:
        assert store.count(index.alias) == len(DEVICES)
        points = {p.id: p for p in store.scroll(index.alias, with_vectors=True)}
    assert sorted(points) == sorted(point_id(d) for d in DEVICES)
    for device, vector in zip(stored.device_ids, stored.matrix, strict=True):
        np.testing.assert_allclose(points[point_id(device)].vector, vector, rtol=1e-6)


@pytest.mark.parametrize(
    "how",
    [
        "truncated id mappings",
        "truncated vectors",
        "deleted vectors",
        "deleted segment",
        "deleted collection config",
        "deleted collection",
    ],
)
def test_a_damaged_collection_is_found_and_repaired_by_the_next_run(landing, resources, instance, how):
    first = index_fleet(landing, resources, instance)
    assert first.asset_materializations_for_node("persona_index")[0].metadata["repaired"].value == "no"
    damage(resources, how)

    rerun = dg.materialize([persona_index], resources=resources, instance=instance)

    assert rerun.success
    metadata = rerun.asset_materializations_for_node("persona_index")[0].metadata
    assert metadata["repaired"].value != "no"  # says what was wrong and what it did
    assert metadata["points"].value == len(DEVICES)
    (check,) = rerun.get_asset_check_evaluations()
    assert check.check_name == ONE_POINT_CHECK and check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert_every_point_is_back(resources)
    again = dg.materialize([persona_index], resources=resources, instance=instance)
    assert again.asset_materializations_for_node("persona_index")[0].metadata["repaired"].value == "no"


class LosesOnePointPerBatch(VectorIndex):
    """The real embedded index on a disk that acknowledges every write and loses the last point of
    each batch (the only fault injected here): no repair can make it whole."""

    @contextmanager
    def open(self) -> Iterator[VectorStore]:
        with super().open() as store:
            real_upsert_batch = store.upsert_batch

            def upsert_batch(collection, ids, vectors, payloads) -> None:
                real_upsert_batch(collection, ids[:-1], vectors[:-1], payloads[:-1])

            store.upsert_batch = upsert_batch
            yield store


def test_a_collection_that_stays_wrong_after_the_repair_fails_the_error_check(landing, resources, instance):
    index_fleet(landing, resources, instance)
    damage(resources, "truncated id mappings")
    losing = LosesOnePointPerBatch(path=resources["vector_index"].path)

    rerun = dg.materialize(
        [persona_index],
        resources={**resources, "vector_index": losing},
        instance=instance,
        raise_on_error=False,
    )

    (check,) = rerun.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert f"for {len(DEVICES)} devices" in check.description
    repaired = rerun.asset_materializations_for_node("persona_index")[0].metadata["repaired"].value
    assert "rewrote every point" in repaired and "rebuilt the collection" in repaired


# Upsert calls FailsAfterPages has seen, over every open (the asset's retries included).
UPSERT_CALLS: list[int] = []


class FailsAfterPages(VectorIndex):
    """The real embedded index that fails every upsert call after the first `pages` (the only
    fault injected here)."""

    pages: int = 0

    @contextmanager
    def open(self) -> Iterator[VectorStore]:
        with super().open() as store:
            real_upsert = store.upsert

            def upsert(collection, ids, vectors, payloads, batch_size=2048) -> int:
                UPSERT_CALLS.append(len(ids))
                if len(UPSERT_CALLS) > self.pages:
                    raise VectorIndexError("the disk is full", detail="the disk is full")
                return real_upsert(collection, ids, vectors, payloads, batch_size)

            store.upsert = upsert
            yield store


def test_the_index_is_written_a_page_at_a_time_and_a_stopped_write_resumes_after_its_pages(
    landing, resources, instance, monkeypatch
):
    """Pages of 97 devices: a write that fails on its fifth page keeps the four written on record,
    and the next run writes only the rest; the collection is then whole."""
    from persona_pipeline.personas import assets as persona_assets

    monkeypatch.setattr(persona_assets, "INDEX_PAGE_ROWS", 97)
    UPSERT_CALLS.clear()
    failing = FailsAfterPages(path=resources["vector_index"].path, pages=4)
    rows = [
        update(d, "device.location.city", CITIES[i % 4], f"{DAY}T10:00:00Z") for i, d in enumerate(DEVICES)
    ]
    write_jsonl(landing, DAY, rows)
    assert dg.materialize(
        [index_updates, device_profiles], resources=resources, instance=instance, partition_key=DAY
    ).success
    stopped = dg.materialize(
        VECTOR_ASSETS,
        resources={**resources, "vector_index": failing},
        instance=instance,
        raise_on_error=False,
    )
    assert not stopped.success

    resumed = dg.materialize([persona_index], resources=resources, instance=instance)
    metadata = resumed.asset_materializations_for_node("persona_index")[0].metadata
    assert metadata["points_written"].value == len(DEVICES) - 4 * 97
    assert metadata["points"].value == len(DEVICES)
    assert_every_point_is_back(resources)
