"""The daemon as `make dev` runs it: new landing files and a feedback batch go all the way to
vectors, segments, scores, offers and weights with no click. Sensors tick every 3 s here
(PERSONA_SENSOR_INTERVAL_SECONDS); the shipped default is 30 s (60 s for feedback)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.app.evaluate_decisions import max_offers_in_window
from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing
from persona_pipeline.resources import VectorIndex
from persona_pipeline.resources.vector_index import point_id
from persona_pipeline_tests.conftest import ENV_VARIABLES, update, write_jsonl

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
START = "2026-03-01"
CHAIN = (
    "persona_vectors",
    "persona_index",
    "segments",
    "device_clusters",
    "anomaly_scores",
    "service_recommendations",
)

# Runs through the daemon, not the store: the SQLite run covers it.
pytestmark = pytest.mark.store_agnostic


def wait_for(what: str, done: Callable[[], bool], daemon_log: Path, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if done():
            return time.monotonic() - started
        time.sleep(2)
    pytest.fail(
        f"{what}: not within {timeout:.0f} s\n--- daemon log (tail) ---\n{daemon_log.read_text()[-4000:]}"
    )


def _daemon_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PERSONA_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("PERSONA_PARTITION_START", START)
    monkeypatch.setenv("PERSONA_SENSOR_INTERVAL_SECONDS", "3")
    # Steps in the run's process: the automation is under test, not the executor, and a process
    # per step costs seconds each on two cores.
    monkeypatch.setenv("PERSONA_EXECUTOR", "in_process")
    from persona_pipeline.app.home import init_home

    init_home()


@contextmanager
def running_daemon(log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
            cwd=REPO,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield daemon
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


@pytest.fixture
def daemon_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    home = tmp_path / "home"
    _daemon_settings(home, monkeypatch)
    log = tmp_path / "daemon.log"
    with running_daemon(log):
        yield home, log


def test_landing_files_and_a_feedback_batch_flow_through_without_a_click(daemon_home):
    from persona_pipeline.app.runner import simulate_feedback

    home, log = daemon_home
    fleet = generate_fleet(200, 3, seed=9, start=START)
    landing = home / "landing"
    write_landing(fleet, landing)
    write_ground_truth(fleet, home / "ground_truth")
    third_day = landing / "index_updates" / "date=2026-03-03"
    held_back = home / "held_back"
    shutil.move(third_day, held_back)

    store = sa.create_engine(f"sqlite:///{home / 'persona.db'}")
    instance = dg.DagsterInstance.get()

    def materialized_after(key: str, since: float) -> bool:
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        return event is not None and event.timestamp > since

    def chain_after(since: float) -> bool:
        return all(materialized_after(key, since) for key in CHAIN)

    def idle() -> bool:
        return not instance.get_runs(
            dg.RunsFilter(
                statuses=[
                    dg.DagsterRunStatus.QUEUED,
                    dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED,
                ]
            )
        )

    def scalar(query: str):
        with store.connect() as connection:
            return connection.execute(sa.text(query)).scalar()

    began = time.time()
    first = wait_for("the first two days through the chain", lambda: chain_after(began) and idle(), log)

    # A new day lands, with a device no one has seen.
    dropped = time.time()
    shutil.move(held_back, third_day)
    write_jsonl(
        landing,
        "2026-03-03",
        [update("dev-newcomer", "device.location.city", "Lisbon", "2026-03-03T12:00:00+00:00", "cust-new")],
        "late-arrival.jsonl",
    )
    profiled = wait_for(
        "the new device in device_profiles",
        lambda: scalar("select count(*) from device_profiles where device_id = 'dev-newcomer'") > 0,
        log,
    )
    indexed = wait_for(
        "the new device's point in Qdrant",
        lambda: scalar("select count(*) from vector_index_state where device_id = 'dev-newcomer'") > 0,
        log,
    )
    wait_for("the third day through the chain", lambda: chain_after(dropped) and idle(), log)

    # People answer the offers: a feedback batch lands.
    answered = time.time()
    simulate_feedback(seed=3, batch_id="batch-1")
    live = "select max(version) from key_weights where status = 'accepted'"
    wait_for(
        "the weights refresh and, when its candidate went live, the chain after it",
        lambda: (
            materialized_after("key_weights", answered)
            and scalar("select min(weights_version) from persona_vectors") == scalar(live)
            and idle()
        ),
        log,
    )
    learned = scalar(live)
    assert scalar("select count(*) from key_weight_refreshes") >= 1  # the batch was learned from
    assert scalar("select min(weights_version) from persona_vectors") == learned
    # The contact budget holds through the sensors' runs: at most 2 offers per device in 7 days.
    offers = pd.read_sql("select device_id, offer_day from service_recommendations", store)
    assert max_offers_in_window(offers) <= 2
    runs = instance.get_runs()
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs), [
        (run.job_name, run.status) for run in runs if run.status != dg.DagsterRunStatus.SUCCESS
    ]
    launched_by = pd.Series([run.tags.get("dagster/sensor_name", "manual") for run in runs]).value_counts()
    assert "manual" not in launched_by.index  # every run came from a sensor
    print(
        f"\nchain for 2 days {first:.0f} s; new file -> profiles {profiled:.0f} s, -> Qdrant point "
        f"{profiled + indexed:.0f} s; runs by sensor: {launched_by.to_dict()}"
    )
    assert profiled + indexed < 300

    instance.dispose()
    with VectorIndex(path=str(home / "qdrant")).open() as index:
        point = index.retrieve("personas", [point_id("dev-newcomer")])
    assert point and point[0].payload["weights_version"] == learned


DECISION_TABLES = {
    "index_updates": "device_id, key, observed_at",
    "device_profiles": "device_id, key, value",
    "service_recommendations": "offer_id",
    "support_tickets": "ticket_id",
    "offer_feedback": "offer_id, response, batch_id",
    "key_weights": "version, key, weight",
}


def _tables(engine: sa.Engine) -> dict[str, pd.DataFrame]:
    with engine.connect() as connection:
        return {
            name: pd.read_sql(sa.text(f"select {columns} from {name} order by {columns}"), connection)
            for name, columns in DECISION_TABLES.items()
        }


def _sensor_ticks(instance: dg.DagsterInstance) -> dict[str, int]:
    return {
        state.name: len(instance.get_ticks(state.instigator_origin_id, state.selector_id))
        for state in instance.all_instigator_state()
        if state.instigator_type.value == "SENSOR"
    }


def test_a_daemon_started_after_the_demo_changes_no_table(tmp_path, monkeypatch):
    """`make dev` after `make demo`: every sensor ticks, and nothing the command line did is
    done again (no ingest of a day it read, no batch loaded twice, no new offer or ticket)."""
    home = tmp_path / "home"
    _daemon_settings(home, monkeypatch)
    fleet = generate_fleet(300, 3, seed=5, start=START)
    write_landing(fleet, home / "landing")
    write_ground_truth(fleet, home / "ground_truth")
    demo = subprocess.run(
        [str(BIN / "persona-pipeline"), "demo", "--rounds", "1"],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    store = sa.create_engine(f"sqlite:///{home / 'persona.db'}")
    before = _tables(store)
    assert len(before["service_recommendations"]) > 0 and len(before["offer_feedback"]) > 0

    instance = dg.DagsterInstance.get()
    runs_before = {run.run_id for run in instance.get_runs()}
    log = tmp_path / "daemon.log"
    sensors = {
        "index_updates_sensor",
        "offer_feedback_sensor",
        "key_weights_sensor",
        "persona_automation_sensor",
        "dead_runs_sensor",
    }
    with running_daemon(log):
        wait_for(
            "three ticks of every sensor",
            lambda: sensors <= {name for name, ticks in _sensor_ticks(instance).items() if ticks >= 3},
            log,
        )
    new_runs = [run for run in instance.get_runs() if run.run_id not in runs_before]
    assert not new_runs, [(run.job_name, run.tags.get("dagster/sensor_name"), run.status) for run in new_runs]
    after = _tables(store)
    for name, frame in before.items():
        pd.testing.assert_frame_equal(after[name], frame, obj=name)
