"""The segments' fit and its application, split: `segments` fits a bounded sample of the fleet and
stores what it fitted (centres, ids, the devices it segmented); `device_clusters` gives every
device its segment, a run per device shard. N shards leave the tables of one shard, and a device
the fit did not read joins its nearest centre."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.app.runner import ChainResult, summary
from persona_pipeline.demo.generator import generate_fleet, write_landing
from persona_pipeline.feedback.assets import key_weights
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.assets import device_profiles, persona_vectors
from persona_pipeline.segments import storage as segment_storage
from persona_pipeline.segments.assets import device_clusters, segments
from persona_pipeline.store import tables
from persona_pipeline_tests.conftest import resources_for, store_url, table
from persona_pipeline_tests.test_celery import clean_env

START = "2026-03-01"
DEVICES = 1_500
SAMPLE = 1_000  # fit_sample_size's smallest value: the fit reads two devices of three
FIT_TABLES = (tables.segment_fits, tables.segments, tables.segment_centres, tables.segment_members)

# Run in a process of its own: PERSONA_DEVICE_SHARDS is read when the code loads. Fits the
# segments with the config given, then runs device_clusters for each shard's partition.
FIT_AND_APPLY = """
import json, sys
import dagster as dg
import pytest
from persona_pipeline.definitions import build_resources
from persona_pipeline.partitions import device_shard_keys
from persona_pipeline.segments.assets import device_clusters, segments

resources = build_resources(resolved=True)
config = {"ops": {"segments": {"config": json.loads(sys.argv[1])}}}
with dg.DagsterInstance.ephemeral() as instance:
    fit = dg.materialize([segments], resources=resources, instance=instance, run_config=config)
    shown = fit.asset_materializations_for_node("segments")[0].metadata
    assigned = []
    for key in device_shard_keys():
        run = dg.materialize([device_clusters], resources=resources, instance=instance, partition_key=key)
        shard = run.asset_materializations_for_node("device_clusters")[0].metadata
        assigned.append(shard["devices_assigned"].value)
fitted = shown["devices_fitted"].value if "devices_fitted" in shown else None
print(json.dumps({"mode": shown["mode"].value, "fitted": fitted, "assigned": assigned}))
"""


def fit_and_apply(home: Path, shards: int, config: dict) -> dict:
    env = clean_env(home, PERSONA_DB_URL=store_url(home), PERSONA_DEVICE_SHARDS=str(shards))
    done = subprocess.run(
        [sys.executable, "-c", FIT_AND_APPLY, json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def segment_tables(home: Path) -> dict[str, pd.DataFrame]:
    store = resources_for(home)["persona_store"]
    return {
        "device_clusters": table(store, "device_clusters", order_by=["device_id"]).drop(
            columns=["clustered_at", "fitted_at"]
        ),
        "segments": table(store, "segments", order_by=["cluster_id"]).drop(
            columns=["first_seen_at", "last_seen_at"]
        ),
        "segment_members": table(store, "segment_members", order_by=["device_id"]),
        "segment_centres": table(store, "segment_centres", order_by=["cluster_id"]).drop(columns="fitted_at"),
    }


def forget_segments(home: Path) -> None:
    """Back to a store that never had segments, so each arm fits from the same state."""
    store = resources_for(home)["persona_store"]
    with store.begin() as connection:
        for segment_table in (tables.device_clusters, *FIT_TABLES):
            connection.execute(segment_table.delete())


def test_n_shards_assign_the_segments_of_a_sampled_fit_as_one_shard_does(persona_home):
    home = persona_home
    resources = small_fleet_with_vectors(home, devices=DEVICES, seed=3)
    fit = {"fit_sample_size": SAMPLE}

    one = fit_and_apply(home, 1, fit)
    one_tables = segment_tables(home)
    forget_segments(home)
    three = fit_and_apply(home, 3, fit)
    three_tables = segment_tables(home)

    assert one == {"mode": "fit", "fitted": SAMPLE, "assigned": [DEVICES]}
    assert three["mode"] == "fit" and three["fitted"] == SAMPLE
    assert len(three["assigned"]) == 3 and min(three["assigned"]) > 0 and sum(three["assigned"]) == DEVICES
    for name, frame in one_tables.items():
        pd.testing.assert_frame_equal(three_tables[name], frame, obj=name)

    # The fit read a sample; the devices it segmented keep its segment, the rest join the nearest centre.
    store = resources["persona_store"]
    clusters = three_tables["device_clusters"].set_index("device_id")
    members = three_tables["segment_members"].set_index("device_id")
    assert len(members) == SAMPLE and len(clusters) == DEVICES
    pd.testing.assert_frame_equal(
        clusters.loc[members.index, ["cluster_id", "distance"]], members[["cluster_id", "distance"]]
    )
    vectors = persona_storage.read_stored_vectors(store)
    fit_stored = segment_storage.read_fit(store, vectors.space, len(vectors.dimension_names))
    others = ~pd.Index(vectors.device_ids).isin(members.index)
    gaps = np.linalg.norm(vectors.matrix[others][:, None, :] - fit_stored.centres[None, :, :], axis=2)
    joined = clusters.loc[vectors.device_ids[others]]
    np.testing.assert_array_equal(joined["cluster_id"], fit_stored.cluster_ids[gaps.argmin(axis=1)])
    np.testing.assert_allclose(joined["distance"], gaps.min(axis=1), rtol=1e-9)

    # The run summary counts today's devices per segment, not the fit's sample.
    printed = summary(ChainResult(START, START, {}))
    counts = re.findall(r"^ {4} *\d+ +([\d,]+) devices  ", printed, flags=re.MULTILINE)
    assert sum(int(count.replace(",", "")) for count in counts) == DEVICES

    # The next day nothing changed: the fit stands and no shard reads a device.
    assert fit_and_apply(home, 3, fit) == {"mode": "kept", "fitted": None, "assigned": [0, 0, 0]}
    after = table(store, "device_clusters", order_by=["device_id"])
    assert after["cluster_id"].tolist() == three_tables["device_clusters"]["cluster_id"].tolist()


def test_a_device_whose_vector_changed_after_the_fit_joins_the_nearest_centre_not_its_fitted_segment(
    persona_home,
):
    resources = small_fleet_with_vectors(persona_home)
    store = resources["persona_store"]
    with dg.instance_for_test() as instance:
        assert dg.materialize([segments], resources=resources, instance=instance).success
        vectors = persona_storage.read_stored_vectors(store)
        fit = segment_storage.read_fit(store, vectors.space, len(vectors.dimension_names))
        # One device's vector moves onto another segment's centre after the fit read it.
        members = table(store, "segment_members").set_index("device_id")
        device = vectors.device_ids[0]
        other = int(np.flatnonzero(fit.cluster_ids != members.loc[device, "cluster_id"])[0])
        with store.begin() as connection:
            connection.execute(
                tables.persona_vectors.update()
                .where(tables.persona_vectors.c.device_id == device)
                .values(
                    vector=persona_storage.encode_vectors(fit.centres[[other]].astype(np.float32))[0],
                    computed_at=pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=1),
                )
            )
        assert dg.materialize([device_clusters], resources=resources, instance=instance).success
    clusters = table(store, "device_clusters").set_index("device_id")
    assert clusters.loc[device, "cluster_id"] == fit.cluster_ids[other]
    assert clusters.loc[device, "distance"] < 1e-3
    unchanged = members.index.drop(device)
    assert (clusters.loc[unchanged, "cluster_id"] == members.loc[unchanged, "cluster_id"]).all()
    count = store.scalar(sa.select(sa.func.count()).select_from(tables.device_clusters))
    assert count == len(vectors.device_ids)


def small_fleet_with_vectors(home: Path, devices: int = 200, seed: int = 4) -> dict:
    write_landing(generate_fleet(devices, 1, seed=seed, start=START), home / "landing")
    resources = resources_for(home)
    with dg.instance_for_test() as instance:
        ingest = [index_updates, device_profiles]
        assert dg.materialize(ingest, resources=resources, instance=instance, partition_key=START).success
        assert dg.materialize([key_weights, persona_vectors], resources=resources, instance=instance).success
    return resources


def test_a_density_fit_that_finds_no_segment_leaves_every_device_as_noise(persona_home):
    resources = small_fleet_with_vectors(persona_home)
    config = {"ops": {"segments": {"config": {"algorithm": "hdbscan", "hdbscan_min_cluster_size": 5000}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [segments, device_clusters], resources=resources, instance=instance, run_config=config
        )
    assert result.success
    clusters = table(resources["persona_store"], "device_clusters")
    assert len(clusters) == 200 and (clusters["cluster_id"] == -1).all()


def test_an_assignment_that_read_the_fit_before_a_new_one_was_stored_is_done_again(persona_home, monkeypatch):
    """A shard's run that starts while `segments` fits, and reads the fit it replaces, marks its
    rows as of that fit: the next run assigns them to the new one."""
    resources = small_fleet_with_vectors(persona_home, devices=300)
    store = resources["persona_store"]
    four, eight = ({"ops": {"segments": {"config": {"n_clusters": k}}}} for k in (4, 8))
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [segments, device_clusters], resources=resources, instance=instance, run_config=four
        ).success
        changed = table(store, "persona_vectors", order_by=["device_id"])["device_id"].iloc[:20].tolist()
        with store.begin() as connection:
            connection.execute(
                tables.persona_vectors.update()
                .where(tables.persona_vectors.c.device_id.in_(changed))
                .values(computed_at=pd.Timestamp.now(tz="UTC").to_pydatetime())
            )
        write_fit = segment_storage.write_fit

        def assignment_during_the_fit(*args, **kwargs) -> None:
            assert dg.materialize([device_clusters], resources=resources, instance=instance).success
            write_fit(*args, **kwargs)

        monkeypatch.setattr(segment_storage, "write_fit", assignment_during_the_fit)
        assert dg.materialize([segments], resources=resources, instance=instance, run_config=eight).success
        monkeypatch.setattr(segment_storage, "write_fit", write_fit)
        again = dg.materialize([device_clusters], resources=resources, instance=instance)
    assert (
        again.asset_materializations_for_node("device_clusters")[0].metadata["devices_assigned"].value == 300
    )
    vectors = persona_storage.read_stored_vectors(store)
    fit = segment_storage.read_fit(store, vectors.space, len(vectors.dimension_names))
    clusters = table(store, "device_clusters").set_index("device_id")
    assert set(clusters["cluster_id"]) <= set(fit.cluster_ids) and len(fit.cluster_ids) == 8
    assert segment_storage.count_not_current(store, None, vectors.space, fit.fitted_at) == 0


@pytest.mark.parametrize("algorithm", ["kmeans", "hdbscan"])
def test_segments_run_again_before_the_assignment_keep_their_ids(persona_home, algorithm):
    resources = small_fleet_with_vectors(persona_home)
    config = {"ops": {"segments": {"config": {"algorithm": algorithm, "hdbscan_min_cluster_size": 15}}}}
    store = resources["persona_store"]
    with dg.instance_for_test() as instance:
        assert dg.materialize([segments], resources=resources, instance=instance, run_config=config).success
        first = table(store, "segments", order_by=["cluster_id"])
        second = dg.materialize([segments], resources=resources, instance=instance, run_config=config)
    registry = table(store, "segments", order_by=["cluster_id"])
    assert registry["cluster_id"].tolist() == first["cluster_id"].tolist() and registry["active"].all()
    mode = second.asset_materializations_for_node("segments")[0].metadata["mode"].value
    assert mode == ("fit" if algorithm == "hdbscan" else "kept")  # density algorithms fit every run
