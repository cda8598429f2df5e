"""The code location as users meet it: `dagster-webserver` and `dagster-daemon` on the shipped
workspace.yaml and dagster.yaml, driven through the webserver's GraphQL API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from persona_pipeline.definitions import defs
from persona_pipeline.ingest.assets import IndexUpdatesConfig, index_updates
from persona_pipeline.partitions import daily_partitions
from persona_pipeline.personas.assets import device_profiles
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore
from persona_pipeline_tests.conftest import accepted_updates, table

# Its servers use their own embedded home, whatever --store says.
pytestmark = pytest.mark.store_agnostic

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
LOCATION = "persona_pipeline"
DEVICES = 100
# 30 days from the partitions' start, which the servers get through PERSONA_PARTITION_START too.
DAYS = pd.date_range(daily_partitions.start.date(), periods=30, freq="D").strftime("%Y-%m-%d").tolist()
INGEST = {index_updates.key.to_user_string(), device_profiles.key.to_user_string()}
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# Backfill runs execute their steps in the run's process, as the launchpad's run config allows; the
# default, a process per step (about 15 s more per run on two cores), is what the single run uses.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

# `dagster-daemon run`, except that the backfill daemon ticks every 2 s instead of every 30 s:
# its interval is a module constant, not an instance setting, and a backfill takes two ticks.
DAEMON = (
    "import dagster._daemon.controller as controller; "
    "controller.DEFAULT_DAEMON_INTERVAL_SECONDS = 2; "
    "from dagster._daemon.cli import main; main()"
)

WORKSPACE = """
query {
  workspaceOrError {
    __typename
    ... on PythonError { message }
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
          ... on RepositoryLocation {
            repositories {
              name
              jobs { name }
              schedules { name }
              sensors { name }
              assetNodes {
                assetKey { path }
                description
                groupName
                dependencyKeys { path }
                owners {
                  ... on TeamAssetOwner { team }
                  ... on UserAssetOwner { email }
                }
                metadataEntries {
                  label
                  ... on TableSchemaMetadataEntry { schema { columns { name type } } }
                }
                assetChecksOrError {
                  __typename
                  ... on AssetChecks { checks { name } }
                }
              }
            }
          }
        }
      }
    }
  }
}
"""

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
  }
}
"""

RUN_FIELDS = """
  runId
  status
  tags { key value }
  assetSelection { path }
  stepStats { stepKey status }
  assetMaterializations {
    assetKey { path }
    partition
    metadataEntries { label ... on IntMetadataEntry { intValue } }
  }
"""

RUN = f"""
query($runId: ID!) {{
  runOrError(runId: $runId) {{
    __typename
    ... on Run {{ {RUN_FIELDS} }}
  }}
}}
"""

RUN_ERRORS = """
query($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run {
      eventConnection(limit: 1000) {
        events {
          ... on MessageEvent { level message }
          ... on ErrorEvent { error { message } }
        }
      }
    }
  }
}
"""

LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""

BACKFILL = f"""
query($backfillId: String!) {{
  partitionBackfillOrError(backfillId: $backfillId) {{
    __typename
    ... on PartitionBackfill {{
      status
      error {{ message }}
      runs {{ {RUN_FIELDS} }}
      assetBackfillData {{
        assetBackfillStatuses {{
          ... on AssetPartitionsStatusCounts {{
            assetKey {{ path }}
            numPartitionsTargeted
            numPartitionsMaterialized
          }}
        }}
      }}
    }}
  }}
}}
"""

RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return f"--- {self.name} (exit code {self.process.poll()}), last lines of {self.log}:\n{text}"


@dataclass
class Ui:
    url: str
    home: Path
    servers: list[Server] = field(repr=False)

    def query(self, text: str, **variables: object) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": text, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # GraphQL errors come with status 400
            body = json.load(error)
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def logs(self) -> str:
        return "\n".join(server.tail() for server in self.servers)

    def locations(self) -> list[dict]:
        workspace = self.query(WORKSPACE)["workspaceOrError"]
        assert workspace["__typename"] == "Workspace", workspace
        return workspace["locationEntries"]

    def repository(self) -> dict:
        [location] = self.locations()
        loaded = location["locationOrLoadError"]
        assert loaded["__typename"] == "RepositoryLocation", loaded
        [repository] = loaded["repositories"]
        return repository

    def wait_until_loaded(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = [server.name for server in self.servers if server.process.poll() is not None]
            if exited:
                raise RuntimeError(f"{', '.join(exited)} exited before the UI was up\n{self.logs()}")
            try:
                if any(entry["loadStatus"] == "LOADED" for entry in self.locations()):
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the UI did not load {LOCATION} within {timeout:.0f} s\n{self.logs()}")

    def launch_run(self, job: str, partition: str) -> str:
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": self.repository()["name"],
                "jobName": job,
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
        }
        launched = self.query(LAUNCH_RUN, params=params)["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def wait_for_run(self, run_id: str, timeout: float) -> dict:
        run = self._poll(lambda: self.query(RUN, runId=run_id)["runOrError"], RUN_DONE, timeout)
        assert run["status"] == "SUCCESS", self.run_errors(run_id)
        return run

    def run_errors(self, run_id: str) -> str:
        events = self.query(RUN_ERRORS, runId=run_id)["runOrError"]["eventConnection"]["events"]
        lines = [
            (event.get("error") or {}).get("message") or event.get("message", "")
            for event in events
            if event.get("level") == "ERROR" or event.get("error")
        ]
        return f"run {run_id} did not succeed:\n" + "\n".join(lines)

    def launch_backfill(self, assets: set[str], start: str, end: str) -> str:
        params = {
            "partitionsByAssets": [
                {"assetKey": {"path": [asset]}, "partitions": {"range": {"start": start, "end": end}}}
                for asset in sorted(assets)
            ],
            "runConfigData": IN_PROCESS,
        }
        launched = self.query(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return launched["backfillId"]

    def wait_for_backfill(self, backfill_id: str, timeout: float) -> dict:
        backfill = self._poll(
            lambda: self.query(BACKFILL, backfillId=backfill_id)["partitionBackfillOrError"],
            BACKFILL_DONE,
            timeout,
        )
        failed = [self.run_errors(run["runId"]) for run in backfill["runs"] if run["status"] != "SUCCESS"]
        assert backfill["status"] == "COMPLETED_SUCCESS", (backfill["status"], backfill["error"], failed)
        return backfill

    def _poll(self, fetch: Callable[[], dict], done: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = fetch()
            assert "status" in found, found
            if found["status"] in done:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {found['status']} after {timeout:.0f} s")
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(name: str, command: list[str], env: dict[str, str], log: Path) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, process, log)


def stop(servers: list[Server]) -> None:
    """Terminate the servers, then whatever is left of their process groups (code servers, run workers)."""
    for server in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(server.process.pid, 0)
                time.sleep(0.2)
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    home = tmp_path_factory.mktemp("webserver") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "QDRANT_", "DAGSTER_"))}
    env |= {
        "PERSONA_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "PERSONA_PARTITION_START": DAYS[0],
        # This test launches runs and backfills by hand; with the sensors on, the landing sensor
        # would ingest the 30 days too and the backfill would queue behind those runs.
        # test_daemon.py covers the automation.
        "PERSONA_AUTOMATION": "off",
    }
    fleet = ["--devices", str(DEVICES), "--days", str(len(DAYS)), "--start", DAYS[0]]
    generated = subprocess.run(
        [str(BIN / "persona-pipeline"), "generate", *fleet], env=env, capture_output=True, text=True
    )
    assert generated.returncode == 0, generated.stderr
    # Create the instance's SQLite storage first: the webserver and the daemon starting together on
    # an empty DAGSTER_HOME both try to create it, and one fails ("table alembic_version already exists").
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]):
        pass

    url = f"http://127.0.0.1:{free_port()}"
    servers: list[Server] = []
    try:
        port = url.rsplit(":", 1)[1]
        web = [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", port]
        servers.append(start("dagster-webserver", web, env, home.parent / "webserver.log"))
        daemon = [sys.executable, "-c", DAEMON, "run", "-w", "workspace.yaml"]
        servers.append(start("dagster-daemon", daemon, env, home.parent / "daemon.log"))
        running = Ui(url, home, servers)
        running.wait_until_loaded(timeout=180)
        yield running
    finally:
        stop(servers)


@pytest.fixture(autouse=True)
def server_logs(ui: Ui) -> Iterator[None]:
    yield
    print(ui.logs())  # pytest shows this only for a failed test


def names(items: list[dict]) -> set[str]:
    return {item["name"] for item in items}


def test_location_loads_with_every_asset_job_schedule_and_sensor(ui):
    [location] = ui.locations()
    assert location["name"] == LOCATION
    assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation", location
    repository = ui.repository()

    expected = defs.get_repository_def()
    assert names(repository["jobs"]) == {job.name for job in expected.get_all_jobs()}
    assert names(repository["schedules"]) == {schedule.name for schedule in expected.schedule_defs}
    assert names(repository["sensors"]) == {sensor.name for sensor in expected.sensor_defs}

    graph = defs.resolve_asset_graph()
    nodes = {dg.AssetKey(node["assetKey"]["path"]): node for node in repository["assetNodes"]}
    assert set(nodes) == set(graph.get_all_asset_keys())
    for key, node in nodes.items():
        assert (node["description"] or "").strip(), f"{key.to_user_string()} has no description"
        assert node["groupName"] not in ("", "default"), f"{key.to_user_string()} is in no group"
        lineage = {dg.AssetKey(parent["path"]) for parent in node["dependencyKeys"]}
        assert lineage == set(graph.get(key).parent_keys), key.to_user_string()
        # The catalog a data team expects: who owns it, the columns it writes, at least one check.
        assert node["owners"], f"{key.to_user_string()} has no owner"
        schemas = [e for e in node["metadataEntries"] if e["label"] == "dagster/column_schema"]
        assert schemas and schemas[0]["schema"]["columns"], f"{key.to_user_string()} has no column schema"
        assert node["assetChecksOrError"]["__typename"] == "AssetChecks", node["assetChecksOrError"]
        assert node["assetChecksOrError"]["checks"], f"{key.to_user_string()} has no asset check"


def test_a_run_launched_from_the_ui_succeeds(ui):
    run_id = ui.launch_run("ingest_job", DAYS[0])
    run = ui.wait_for_run(run_id, timeout=180)

    materialized = {(m["assetKey"]["path"][-1], m["partition"]) for m in run["assetMaterializations"]}
    assert materialized == {(asset, DAYS[0]) for asset in INGEST}
    [ingested] = [m for m in run["assetMaterializations"] if m["assetKey"]["path"] == ["index_updates"]]
    accepted = {entry["label"]: entry.get("intValue") for entry in ingested["metadataEntries"]}
    assert accepted["rows_accepted"] > 0  # the run read the landing zone of PERSONA_HOME


def day_by_day_profiles(landing: Path, db: Path) -> pd.DataFrame:
    """`device_profiles` after materializing the days one at a time, oldest first: each asset
    invoked with a one-day partition context (the code of a run, without a run's start-up)."""
    store = PersonaStore(url=f"sqlite:///{db}", history_dir=str(db.parent / "day_by_day_history"))
    resources = {"landing_zone": LandingZone(path=str(landing)), "persona_config": PersonaConfig()}
    for day in DAYS:
        with dg.build_asset_context(partition_key=day) as context:
            index_updates(context, config=IndexUpdatesConfig(), persona_store=store, **resources)
        with dg.build_asset_context(partition_key=day) as context:
            device_profiles(context, persona_store=store)
    return table(store, "device_profiles", ["device_id", "key"])


def assert_one_range_run(backfill: dict) -> None:
    """Both assets have a single-run backfill policy and the same daily partitions, so the backfill
    daemon puts them in one run over the whole range: one step per asset, not one run per day."""
    [run] = backfill["runs"]
    assert run["status"] == "SUCCESS"
    assert {key["path"][-1] for key in run["assetSelection"]} == INGEST
    assert sorted(step["stepKey"] for step in run["stepStats"]) == sorted(INGEST)
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    assert (tags[RANGE_START_TAG], tags[RANGE_END_TAG]) == (DAYS[0], DAYS[-1])
    materialized = sorted((m["assetKey"]["path"][-1], m["partition"]) for m in run["assetMaterializations"])
    assert materialized == sorted((asset, day) for asset in INGEST for day in DAYS)
    for status in backfill["assetBackfillData"]["assetBackfillStatuses"]:
        assert status["numPartitionsTargeted"] == status["numPartitionsMaterialized"] == len(DAYS), status


def partition_counts(run: dict, asset: str, label: str) -> dict[str, int]:
    """`label`'s integer on each partition's materialization of `asset` in `run`, as the UI reads it."""
    return {
        m["partition"]: next(e["intValue"] for e in m["metadataEntries"] if e["label"] == label)
        for m in run["assetMaterializations"]
        if m["assetKey"]["path"] == [asset]
    }


def rows_per_day(rows: pd.DataFrame) -> dict[str, int]:
    """`rows` on each of DAYS by their partition_date, zeros included."""
    return rows["partition_date"].value_counts().reindex(DAYS, fill_value=0).to_dict()


def test_a_30_day_backfill_is_one_run_equal_to_day_by_day_and_safe_to_repeat(ui, tmp_path):
    store = PersonaStore(url=f"sqlite:///{ui.home / 'persona.db'}", history_dir=str(ui.home / "history"))
    backfill_id = ui.launch_backfill(INGEST, DAYS[0], DAYS[-1])
    expected = day_by_day_profiles(ui.home / "landing", tmp_path / "day_by_day.db")
    assert expected["device_id"].nunique() == DEVICES

    assert_one_range_run(ui.wait_for_backfill(backfill_id, timeout=300))
    profiles = table(store, "device_profiles", ["device_id", "key"])
    pd.testing.assert_frame_equal(profiles, expected)
    updates, rejects = len(accepted_updates(store)), len(table(store, "index_update_rejects"))
    assert updates > 0 and rejects > 0  # the demo fleet plants malformed rows
    # Each partition the range run materialized shows its own day's counts in the UI.
    [run] = ui.wait_for_backfill(backfill_id, timeout=10)["runs"]
    accepted = rows_per_day(accepted_updates(store))
    rejected = rows_per_day(table(store, "index_update_rejects"))
    assert partition_counts(run, "index_updates", "rows_accepted") == accepted
    assert partition_counts(run, "device_profiles", "updates_read") == accepted
    assert partition_counts(run, "index_updates", "rows_rejected") == rejected

    again = ui.launch_backfill(INGEST, DAYS[0], DAYS[-1])
    assert again != backfill_id
    assert_one_range_run(ui.wait_for_backfill(again, timeout=300))
    pd.testing.assert_frame_equal(table(store, "device_profiles", ["device_id", "key"]), expected)
    assert len(accepted_updates(store)) == updates
    assert len(table(store, "index_update_rejects")) == rejects
