"""`persona-pipeline run` killed with SIGKILL at each step of the chain in turn: the next run
completes, with one point per profiled device, no duplicate offer and no pool slot left held."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from persona_pipeline.resources import VectorIndex
from persona_pipeline.run_health import reap_dead_runs
from persona_pipeline_tests.conftest import store_url
from persona_pipeline_tests.test_celery import CHAIN
from persona_pipeline_tests.test_cli_and_definitions import run_cli

SCRIPT = Path(sys.executable).parent / "persona-pipeline"

# The steps a run is killed in, one new day each: key_weights only records the configured weights
# once and finds no feedback here, a step too quick to land a kill in.
KILLED_IN = tuple(step for step in CHAIN if step != "key_weights")


def _cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "QDRANT_", "DAGSTER_"))}
    return {**env, "PERSONA_HOME": str(home), "PERSONA_DB_URL": store_url(home)}


def _step_in_progress(instance: dg.DagsterInstance, run_ids_before: set[str]) -> str | None:
    """The step the newest run (started after `run_ids_before`) has begun and not finished."""
    runs = [run for run in instance.get_runs(limit=5) if run.run_id not in run_ids_before]
    for run in runs:
        started, ended = set(), set()
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or event.step_key is None:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                started.add(event.step_key)
            elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                ended.add(event.step_key)
        if started - ended:
            return sorted(started - ended)[0]
    return None


def _kill_during(
    step: str, home: Path, instance: dg.DagsterInstance, sig: signal.Signals = signal.SIGKILL
) -> tuple[str | None, subprocess.Popen]:
    """Start `persona-pipeline run`, send `sig` to its whole process group once `step` (or a later
    one) has begun; the step that was running then, and the ended process."""
    before = {run.run_id for run in instance.get_runs()}
    process = subprocess.Popen(
        [str(SCRIPT), "run"],
        env=_cli_env(home),
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    killed_in = None
    while time.monotonic() < deadline and process.poll() is None:
        running = _step_in_progress(instance, before)
        if running is not None and CHAIN.index(running) >= CHAIN.index(step):
            os.killpg(process.pid, sig)
            killed_in = running
            break
        time.sleep(0.05)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"persona-pipeline run did not end within 90 s of {sig.name}")
    return killed_in, process


def test_a_run_killed_at_each_step_leaves_the_next_run_whole(tmp_path):
    home = tmp_path / "home"
    days = len(KILLED_IN) + 2
    generated = run_cli(
        "generate", "--devices", "400", "--days", str(days), "--start", "2026-03-01", cwd=tmp_path, home=home
    )
    assert generated.returncode == 0, generated.stderr
    # Every killed run gets a new day, so each of its steps has work to do (most of the fleet
    # changes: segments are fitted anew, not only assigned) and a kill can land in it.
    updates, held_back = home / "landing" / "index_updates", tmp_path / "held_back"
    held_back.mkdir()
    later_days = sorted(updates.iterdir())[2:]
    for folder in later_days:
        shutil.move(folder, held_back / folder.name)
    first = run_cli("run", cwd=tmp_path, home=home)  # the instance and stores exist from here on
    assert first.returncode == 0, first.stderr[-2000:]

    engine = sa.create_engine(store_url(home))
    killed_in = []
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        for step, folder in zip(KILLED_IN, later_days, strict=True):
            shutil.move(held_back / folder.name, folder)
            killed_in.append(_kill_during(step, home, instance)[0])
            again = run_cli("run", cwd=tmp_path, home=home)
            assert again.returncode == 0, f"after a kill in {killed_in[-1]}: {again.stderr[-2000:]}"
            assert "waits for" not in again.stderr

            with engine.connect() as connection:
                devices = connection.execute(
                    sa.text("select count(distinct device_id) from device_profiles")
                ).scalar()
                duplicates = connection.execute(
                    sa.text(
                        "select count(*) from (select device_id, service_id, offer_day "
                        "from service_recommendations group by 1, 2, 3 having count(*) > 1) d"
                    )
                ).scalar()
            with VectorIndex(path=str(home / "qdrant")).open() as index:
                points = index.count(index.aliases()["personas"])
            assert points == devices == 400, f"after a kill in {killed_in[-1]}"
            assert duplicates == 0
            storage = instance.event_log_storage
            assert not storage.get_concurrency_info("vector_index").claimed_slots
            assert reap_dead_runs(instance) == []  # the next run already dealt with the dead one
            failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            assert failed == []
    engine.dispose()
    # Most kills land in the step asked for; a quick step may already be over by then.
    assert sum(found == step for found, step in zip(killed_in, KILLED_IN, strict=True)) >= 5, killed_in
    assert {"persona_index", "device_clusters"} <= set(killed_in), killed_in


def test_sigterm_ends_a_run_waiting_or_not_and_gives_its_slots_back(tmp_path):
    """SIGTERM is Dagster's interrupt, as Ctrl-C: the command ends instead of ignoring it, and the
    run it stopped holds no slot."""
    home = tmp_path / "home"
    generated = run_cli(
        "generate", "--devices", "300", "--days", "1", "--start", "2026-03-01", cwd=tmp_path, home=home
    )
    assert generated.returncode == 0, generated.stderr
    assert run_cli("init", cwd=tmp_path, home=home).returncode == 0
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        stopped_in, process = _kill_during("persona_index", home, instance, signal.SIGTERM)
        assert stopped_in is not None and process.returncode != 0
        assert not instance.event_log_storage.get_concurrency_info("vector_index").claimed_slots


@pytest.mark.store_agnostic
def test_a_run_is_alive_by_its_own_processes_not_by_the_launcher_that_started_it():
    """A run the daemon launched has a RUN_STARTING event written by the daemon, which lives on:
    counted as the run's process, it kept a killed run 'alive' for good."""
    from types import SimpleNamespace

    from persona_pipeline.run_health import run_process_pids

    gone = subprocess.Popen(["true"])
    gone.wait()

    def entry(event_type: dg.DagsterEventType, pid: int) -> SimpleNamespace:
        return SimpleNamespace(dagster_event=SimpleNamespace(event_type=event_type, pid=pid))

    entries = [
        entry(dg.DagsterEventType.RUN_STARTING, os.getpid()),  # the launcher, alive
        entry(dg.DagsterEventType.RUN_START, gone.pid),  # the run worker, killed
        entry(dg.DagsterEventType.STEP_START, gone.pid),
        SimpleNamespace(dagster_event=None),
    ]
    assert run_process_pids(entries) == {gone.pid}
