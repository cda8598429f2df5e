"""A persona store that cannot be written (a full disk, a read-only file or server) fails with one
line naming the store, its path and what is wrong, from whichever helper was writing; not a
bare "disk I/O error" or "attempt to write a readonly database"."""

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.personas import storage
from persona_pipeline.resources import PersonaStore, VectorIndex
from persona_pipeline.resources.persona_store import StoreUnavailable
from persona_pipeline.resources.vector_index import VectorIndexError, point_ids


def dimensions(rows: int, name_length: int = 16) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "position": np.arange(rows),
            "name": [f"{i:0{name_length}d}" for i in range(rows)],
            "weight_key": "device.battery.level",
            "weight": 0.5,
        }
    )


@pytest.mark.store_agnostic
def test_a_read_only_sqlite_store_names_its_file(tmp_path):
    path = tmp_path / "persona.db"
    storage.write_dimensions(PersonaStore(url=f"sqlite:///{path}"), "space-1", dimensions(3))
    read_only = PersonaStore(url=f"sqlite:///file:{path}?mode=ro&uri=true")
    assert len(storage.read_dimensions(read_only, "space-1")) == 3  # reads still work

    with pytest.raises(StoreUnavailable) as raised:
        storage.write_dimensions(read_only, "space-2", dimensions(3))

    message = str(raised.value)
    assert "\n" not in message
    assert str(path) in message and "is read-only" in message
    assert len(storage.read_dimensions(PersonaStore(url=f"sqlite:///{path}"), "space-1")) == 3  # nothing lost


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 2 MiB tmpfs (tests run as root); skipped where mounting is not permitted."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.store_agnostic
def test_a_sqlite_store_on_a_full_disk_says_the_disk_is_full_and_names_the_file(small_disk):
    path = small_disk / "persona.db"
    store = PersonaStore(url=f"sqlite:///{path}")
    storage.write_dimensions(store, "space-1", dimensions(3))

    with pytest.raises(StoreUnavailable) as raised:
        storage.write_dimensions(store, "space-2", dimensions(100_000, name_length=64))

    message = str(raised.value)
    assert "\n" not in message
    assert str(path) in message and "full" in message
    assert len(storage.read_dimensions(store, "space-1")) == 3  # the earlier rows are still there


@pytest.mark.store_agnostic
def test_a_read_only_postgresql_store_says_so_and_masks_its_password(postgres_database):
    url = postgres_database("pw-not-shown")
    storage.write_dimensions(PersonaStore(url=url), "space-1", dimensions(3))
    read_only_url = sa.make_url(url).update_query_dict({"options": "-c default_transaction_read_only=on"})
    read_only = PersonaStore(url=read_only_url.render_as_string(hide_password=False))

    with pytest.raises(StoreUnavailable) as raised:
        storage.write_dimensions(read_only, "space-2", dimensions(3))

    message = str(raised.value)
    assert "is read-only" in message and "pw-not-shown" not in message and "***" in message


@pytest.mark.store_agnostic
def test_the_embedded_vector_index_on_a_full_disk_names_the_collection_folder(small_disk):
    index = VectorIndex(path=str(small_disk / "qdrant"), embedded_engine="edge")
    rng = np.random.default_rng(0)
    with index.open() as store, pytest.raises(VectorIndexError) as raised:
        store.ensure_collection("personas_full", 64)
        for start in range(0, 200_000, 5_000):
            ids = point_ids([f"d{i}" for i in range(start, start + 5_000)])
            store.upsert("personas_full", ids, rng.random((5_000, 64)), [{"device_id": "x" * 200}] * 5_000)

    message = str(raised.value)
    assert f"the disk holding {small_disk / 'qdrant' / 'collections' / 'personas_full'} is full" in message
