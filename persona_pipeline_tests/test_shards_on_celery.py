"""A day over its device shards, as a person launches it: one backfill through the webserver's API,
its runs' steps executed by two Celery workers on the loopback broker, leaving what one shard
leaves; with the landing zone and the update history in local folders, and on an object store
(an S3-compatible server on loopback) that workers on other machines could share."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.demo.generator import generate_fleet, write_landing
from persona_pipeline.device_shards import shard_of
from persona_pipeline.ingest.assets import IndexUpdatesConfig, index_updates
from persona_pipeline.personas.assets import device_profiles
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore
from persona_pipeline.store.tables import metadata
from persona_pipeline_tests.conftest import ObjectStore
from persona_pipeline_tests.test_celery import Workers, clean_env, forget_queue, loopback_broker, start_worker
from persona_pipeline_tests.test_celery import stop as stop_worker
from persona_pipeline_tests.test_webserver import DAEMON, LAUNCH_BACKFILL, Server, Ui, free_port, start
from persona_pipeline_tests.test_webserver import stop as stop_servers

pytestmark = pytest.mark.store_agnostic

BIN = Path(sys.executable).parent
REPO = Path(__file__).parents[1]
DAY = "2026-03-02"
SHARDS = 2
DEVICES = 300
INGEST = ("index_updates", "device_profiles")
UNCOMPARED = {"rejected_at", "device_shard", "device_shards"}


@dataclass
class ShardedDeployment:
    ui: Ui
    workers: Workers
    home: Path
    landing: str  # a local folder or an s3:// URL
    history: str


@pytest.fixture(params=["local folders", "object store"])
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ShardedDeployment]:
    """A webserver and a daemon on the embedded home, and two Celery workers, all with two device
    shards and the Celery executor; the landing zone and the update history in the home's folders,
    or on the object store."""
    broker = loopback_broker()
    if broker is None:
        pytest.fail("no Celery broker answers on loopback (Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672)")
    home = tmp_path / "home"
    landing, history = str(home / "landing"), str(home / "history")
    write_landing(generate_fleet(DEVICES, 3, seed=5, start="2026-03-01"), home / "landing")
    stores = {}
    if request.param == "object store":
        bucket: ObjectStore = request.getfixturevalue("object_store")  # AWS_* set for the servers too
        bucket.upload(home / "landing", "landing")
        shutil.rmtree(home / "landing")  # read from the object store, or not at all
        landing, history = bucket.url("landing"), bucket.url("history")
        stores = {"PERSONA_LANDING_DIR": landing, "PERSONA_HISTORY_DIR": history}
    queue = f"persona-test-{uuid.uuid4().hex[:8]}"
    env = clean_env(
        home,
        DAGSTER_HOME=str(home / "dagster"),
        PERSONA_EXECUTOR="celery",
        PERSONA_CELERY_BROKER=broker,
        PERSONA_CELERY_QUEUE=queue,
        PERSONA_DEVICE_SHARDS=str(SHARDS),
        PERSONA_PARTITION_START="2026-03-01",
        PERSONA_AUTOMATION="off",
        **stores,
    )
    (home / "dagster").mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")  # as `persona-pipeline init` does
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]):
        pass  # the instance's storage exists before the servers race to create it

    names = [f"persona-shard-w{i}-{queue[-8:]}" for i in (1, 2)]
    workers = Workers({}, {name: tmp_path / f"{name}.log" for name in names}, env)
    servers: list[Server] = []
    try:
        for name in names:
            workers.processes[name] = start_worker(name, env, workers.logs[name])
        url = f"http://127.0.0.1:{free_port()}"
        web = [
            str(BIN / "dagster-webserver"),
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            url.rsplit(":", 1)[1],
        ]
        servers.append(start("dagster-webserver", web, env, tmp_path / "webserver.log"))
        daemon = [sys.executable, "-c", DAEMON, "run", "-w", "workspace.yaml"]
        servers.append(start("dagster-daemon", daemon, env, tmp_path / "daemon.log"))
        ui = Ui(url, home, servers)
        ui.wait_until_loaded(timeout=180)
        workers.wait_until_ready(timeout=90)
        yield ShardedDeployment(ui, workers, home, landing, history)
        print(ui.logs(), workers.output())  # shown for a failed test only
    finally:
        stop_servers(servers)
        for process in workers.processes.values():
            stop_worker(process)
        forget_queue(broker, queue)


def one_shard_tables(landing: str, root: Path) -> dict[str, pd.DataFrame]:
    """index_updates and device_profiles of DAY on one shard, invoked in this process."""
    store = PersonaStore(url=f"sqlite:///{root / 'persona.db'}", history_dir=str(root / "history"))
    with dg.build_asset_context(partition_key=DAY) as context:
        index_updates(
            context,
            config=IndexUpdatesConfig(),
            persona_store=store,
            landing_zone=LandingZone(path=landing),
            persona_config=PersonaConfig(),
        )
    with dg.build_asset_context(partition_key=DAY) as context:
        device_profiles(context, persona_store=store)
    return compared_tables(store)


def compared_tables(store: PersonaStore) -> dict[str, pd.DataFrame]:
    orders = {
        "device_profiles": ["device_id", "key"],
        "index_update_rejects": ["source_file", "source_row"],
    }
    frames = {}
    for name, order in orders.items():
        frame = store.read_frame(sa.select(metadata.tables[name]))
        frame = frame.drop(columns=[c for c in frame.columns if c in UNCOMPARED])
        frames[name] = frame.sort_values(order).reset_index(drop=True)
    history = store.history.read([DAY]).drop(columns=["partition_date"])
    frames["history"] = history.sort_values(["source_file", "source_row"]).reset_index(drop=True)
    return frames


def test_a_backfill_of_a_day_over_its_shards_runs_on_two_workers_and_equals_one_shard(deployment, tmp_path):
    ui = deployment.ui
    partitions = [f"{DAY}|{shard}" for shard in range(SHARDS)]
    params = {"assetSelection": [{"path": [asset]} for asset in INGEST], "partitionNames": partitions}
    launched = ui.query(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill = ui.wait_for_backfill(launched["backfillId"], timeout=420)

    # One run per shard, each materializing both assets of its (day, shard).
    by_partition = {
        next(tag["value"] for tag in run["tags"] if tag["key"] == "dagster/partition"): run
        for run in backfill["runs"]
    }
    assert sorted(by_partition) == partitions
    for partition, run in by_partition.items():
        materialized = sorted(
            (m["assetKey"]["path"][-1], m["partition"]) for m in run["assetMaterializations"]
        )
        assert materialized == sorted((asset, partition) for asset in INGEST)

    # Every step started in a worker process, and both workers took some.
    worker_pids = {process.pid for process in deployment.workers.processes.values()}
    with dg.DagsterInstance.from_config(str(deployment.home / "dagster")) as instance:
        starts = [
            record.dagster_event
            for run in backfill["runs"]
            for record in instance.all_logs(run["runId"])
            if record.dagster_event and record.dagster_event.event_type_value == "STEP_START"
        ]
    assert len(starts) == len(INGEST) * SHARDS
    assert {event.pid for event in starts} == worker_pids

    store = PersonaStore(url=f"sqlite:///{deployment.home / 'persona.db'}", history_dir=deployment.history)
    sharded = compared_tables(store)
    expected = one_shard_tables(deployment.landing, tmp_path / "one-shard")
    assert sharded["device_profiles"]["device_id"].nunique() == DEVICES
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(sharded[name], frame, obj=name)
    for index in range(SHARDS):
        devices = store.history.read([DAY], ["device_id"], shard=index)["device_id"]
        assert len(devices) and (shard_of(devices, SHARDS) == index).all()
    # On the object store, the workers wrote the history there and nothing in the home.
    assert (deployment.home / "history").exists() == (deployment.history == str(deployment.home / "history"))
