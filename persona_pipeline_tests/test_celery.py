"""The chain on Celery: two worker processes execute its steps through the loopback broker and
leave the same tables as an in-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from kombu import Connection

from persona_pipeline.demo.generator import generate_fleet, write_landing
from persona_pipeline.executors import ExecutorSettingsError, distributed, executor_from_env
from persona_pipeline.resources import PersonaStore

# Its stores are the embedded ones whatever --store says: the subject is the executor.
pytestmark = pytest.mark.store_agnostic

BIN = Path(sys.executable).parent
PLANTED_PASSWORD = "planted-broker-secret-7d3f"
# Redis accepts any password for its default user when none is configured, so the planted one
# travels through every URL without being needed; RabbitMQ's guest account is the fallback.
CANDIDATE_BROKERS = (
    f"redis://default:{PLANTED_PASSWORD}@127.0.0.1:6379/0",
    "pyamqp://guest:guest@127.0.0.1:5672//",
)
CHAIN = (
    "index_updates",
    "device_profiles",
    "key_weights",
    "persona_vectors",
    "persona_index",
    "segments",
    "device_clusters",
    "anomaly_scores",
    "service_recommendations",
)
# Wall-clock columns differ between any two runs; everything else must match.
COMPARED = {
    "device_profiles": ["device_id", "key"],
    "key_weights": ["version", "key"],
    "persona_vectors": ["device_id"],
    "device_clusters": ["device_id"],
    "segments": ["cluster_id"],
    "anomaly_scores": ["device_id"],
    "service_recommendations": ["offer_id"],
    "support_tickets": ["ticket_id"],
}
RUN_TIME_COLUMNS = {
    "computed_at",
    "clustered_at",
    "fitted_at",
    "scored_at",
    "created_at",
    "first_seen_at",
    "last_seen_at",
    "updated_at",
    "resolved_at",
}
DAYS = 7
START = "2026-03-01"
END = "2026-03-07"


def loopback_broker() -> str | None:
    for url in CANDIDATE_BROKERS:
        try:
            with Connection(url, connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=1)
            return url
        except Exception:
            continue
    return None


@pytest.fixture
def broker_url() -> str:
    url = loopback_broker()
    if url is None:
        message = "no Celery broker answers on loopback (Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672)"
        if os.environ.get("PERSONA_REQUIRE_SERVICES") == "1":
            pytest.fail(message + " and PERSONA_REQUIRE_SERVICES=1")
        pytest.skip(message)
    return url


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "QDRANT_", "DAGSTER_"))}
    return {**env, "PERSONA_HOME": str(home), **extra}


def start_worker(name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    # solo pool: the worker's own process executes the task, so its pid is the steps' pid.
    with log.open("wb") as output:
        return subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "persona_pipeline.worker",
                "worker",
                "--pool=solo",
                f"--hostname={name}@%h",
                "--prefetch-multiplier=1",
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
                "--loglevel=INFO",
            ],
            env=env,
            cwd=log.parent,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@dataclass
class Workers:
    processes: dict[str, subprocess.Popen]  # by worker name
    logs: dict[str, Path]
    env: dict[str, str]  # theirs, and the distributed run's

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.processes)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                if self.processes[name].poll() is not None:
                    pytest.fail(f"worker {name} exited:\n{self.logs[name].read_text()}")
                if " ready." in self.logs[name].read_text(errors="replace"):
                    waiting.discard(name)
            time.sleep(0.5)
        if waiting:
            pytest.fail(f"workers {sorted(waiting)} not ready after {timeout:.0f} s")

    def output(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs.values())


@pytest.fixture(params=[1, 2], ids=["one shard", "two device shards"])
def workers(tmp_path: Path, broker_url: str, request: pytest.FixtureRequest) -> Iterator[Workers]:
    """Two Celery workers on a queue of their own, for the chain's home `tmp_path/celery`, with
    one device shard or two (the workers and the run that sends them steps load the same)."""
    token = uuid.uuid4().hex[:8]
    env = clean_env(
        tmp_path / "celery",
        PERSONA_EXECUTOR="celery",
        PERSONA_CELERY_BROKER=broker_url,
        PERSONA_CELERY_QUEUE=f"persona-test-{token}",
        PERSONA_DEVICE_SHARDS=str(request.param),
    )
    names = [f"persona-w{i}-{token}" for i in (1, 2)]
    started = Workers({}, {name: tmp_path / f"{name}.log" for name in names}, env)
    try:
        for name in names:
            started.processes[name] = start_worker(name, env, started.logs[name])
        yield started
    finally:
        for process in started.processes.values():
            stop(process)
        forget_queue(broker_url, env["PERSONA_CELERY_QUEUE"])


def forget_queue(url: str, queue: str) -> None:
    """Remove the test's queue from the shared broker (kombu keeps Redis bindings past the queue)."""
    with Connection(url, connect_timeout=2) as connection:
        channel = connection.default_channel
        if connection.transport.driver_type == "redis":
            channel.client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        else:
            channel.queue_delete(queue)
            channel.exchange_delete(queue)


def start_chain(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`persona-pipeline run` over the fleet's days, its output in `log`."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [str(BIN / "persona-pipeline"), "run", "--start", START, "--end", END],
            env=env,
            cwd=env["PERSONA_HOME"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def tables(
    home: Path,
    compared: dict[str, list[str]] = COMPARED,
    dropped: set[str] = RUN_TIME_COLUMNS,
    url: str | None = None,
) -> dict[str, pd.DataFrame]:
    """The `compared` tables of the store at `url` (default: the embedded one of `home`), in their
    order, without the `dropped` columns."""
    import sqlalchemy as sa

    from persona_pipeline.store.tables import metadata

    store = PersonaStore(url=url or f"sqlite:///{home / 'persona.db'}")
    frames = {}
    for name, order in compared.items():
        frame = store.read_frame(sa.select(metadata.tables[name]))
        frame = frame.drop(columns=[c for c in frame.columns if c in dropped])
        frames[name] = frame.sort_values(order).reset_index(drop=True)
    return frames


def test_the_chain_on_two_celery_workers_leaves_the_tables_of_an_in_process_run(tmp_path, workers):
    """With two device shards, the workers run each shard's ingest, vectors and segments
    assignment, and the tables still equal those of one shard run in one process."""
    celery_home, local_home = tmp_path / "celery", tmp_path / "local"
    fleet = generate_fleet(300, DAYS, seed=7, start=START)
    for home in (celery_home, local_home):
        write_landing(fleet, home / "landing")

    # The in-process run overlaps the workers' start and the distributed run, which mostly waits.
    local = start_chain(clean_env(local_home), tmp_path / "local.log")
    try:
        workers.wait_until_ready(timeout=90)
        distributed = start_chain(workers.env, tmp_path / "distributed.log")
        assert distributed.wait(timeout=300) == 0, (
            tmp_path / "distributed.log"
        ).read_text() + workers.output()
        assert local.wait(timeout=300) == 0, (tmp_path / "local.log").read_text()
    finally:
        stop(local)

    celery_tables, local_tables = tables(celery_home), tables(local_home)
    for name, frame in celery_tables.items():
        assert not frame.empty, name
        pd.testing.assert_frame_equal(frame, local_tables[name], obj=name)
    assert celery_tables["device_profiles"]["device_id"].nunique() == 300
    assert celery_tables["service_recommendations"]["trigger"].nunique() >= 2

    # Every step of the chain started in one of the two worker processes, which a Celery task
    # names as its worker; the process that launched the runs only orchestrated.
    worker_pids = {process.pid: name for name, process in workers.processes.items()}
    with dg.DagsterInstance.from_config(str(celery_home / "dagster")) as instance:
        runs = instance.get_runs()
        events = [
            record.dagster_event
            for run in runs
            for record in instance.all_logs(run.run_id)
            if record.dagster_event
        ]
        pools = {pool.name: pool.limit for pool in instance.event_log_storage.get_pool_limits()}
    step_pids = {event.step_key: event.pid for event in events if event.event_type_value == "STEP_START"}
    assert set(step_pids) == set(CHAIN)
    shards = int(workers.env["PERSONA_DEVICE_SHARDS"])
    assigned = {run.tags.get("dagster/partition") for run in runs if run.job_name == "clusters_job"}
    assert assigned == ({str(shard) for shard in range(shards)} if shards > 1 else set())
    assert set(step_pids.values()) <= set(worker_pids), (step_pids, worker_pids)
    claimed_by = {
        event.step_key: event.engine_event_data.metadata["Celery worker"].value
        for event in events
        if event.event_type_value == "ENGINE_EVENT" and "in celery worker" in (event.message or "")
    }
    assert claimed_by.keys() == set(CHAIN)
    for step, hostname in claimed_by.items():
        assert hostname.split("@")[0] == worker_pids[step_pids[step]], (step, hostname)
    # The Qdrant steps went through the instance's pool (limit 1): the Celery executor claims a
    # slot before it sends such a step, so two workers never hold the embedded path at once.
    assert pools == {"vector_index": 1}

    # The broker's password reaches no run record, event, log or stored file. (Only the planted
    # Redis one is searched for: RabbitMQ's "guest" is also its user name, which logs may show.)
    if PLANTED_PASSWORD in workers.env["PERSONA_CELERY_BROKER"]:
        planted = PLANTED_PASSWORD.encode()
        leaks = [str(path) for path in tmp_path.rglob("*") if path.is_file() and planted in path.read_bytes()]
        assert not leaks  # the runs' output and the workers' logs among them
        assert all(PLANTED_PASSWORD not in str(run.run_config) + str(run.tags) for run in runs)


def test_executor_is_chosen_by_environment(monkeypatch):
    monkeypatch.delenv("PERSONA_EXECUTOR", raising=False)
    assert executor_from_env() is None  # Dagster's default: multiprocess
    monkeypatch.setenv("PERSONA_EXECUTOR", "in_process")
    assert executor_from_env() is dg.in_process_executor
    monkeypatch.setenv("PERSONA_EXECUTOR", "celery")
    monkeypatch.delenv("PERSONA_CELERY_BROKER", raising=False)
    with pytest.raises(ExecutorSettingsError, match="PERSONA_CELERY_BROKER"):
        executor_from_env()
    monkeypatch.setenv("PERSONA_CELERY_BROKER", f"redis://default:{PLANTED_PASSWORD}@127.0.0.1:6379/0")
    assert executor_from_env().name == "celery"
    monkeypatch.setenv("PERSONA_EXECUTOR", "k8s")
    steps_as_jobs = executor_from_env()
    assert steps_as_jobs.name == "k8s" and distributed()
    # Its launchpad settings (execution.config) are dagster-k8s's own.
    assert {"max_concurrent", "step_k8s_config"} <= set(steps_as_jobs.config_schema.config_type.fields)
    monkeypatch.setenv("PERSONA_EXECUTOR", "spark")
    with pytest.raises(ExecutorSettingsError, match="PERSONA_EXECUTOR='spark'"):
        executor_from_env()
