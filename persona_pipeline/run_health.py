"""Runs whose processes are gone: found, marked failed, and their pool slots freed.

A run killed with SIGKILL (or by SIGBUS on a full disk) never reports its end, so Dagster keeps
it STARTED and keeps the pool slots it claimed: every later run that needs the `vector_index`
pool waits for it forever. The command line looks before each run and a sensor looks on every
tick. A run counts as dead only when it ran on this machine (launched here by the command line,
or by this instance's default run launcher, whose run workers are local processes) and no
process that wrote one of its events is still alive.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg

HOST_TAG = "persona/host"
# A run starting up has written no event from its own process yet: leave it alone this long.
STARTING_GRACE_SECONDS = 120
DEAD_RUN_MESSAGE = "Marked failed: no process of this run is alive (killed, or the machine stopped)."
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


class CurrentRun:
    """The run this process is executing now, for the SIGTERM handler to fail on the way out."""

    instance: dg.DagsterInstance | None = None
    run_id: str | None = None

    @classmethod
    @contextmanager
    def executing(cls, instance: dg.DagsterInstance, run_id: str) -> Iterator[None]:
        cls.instance, cls.run_id = instance, run_id
        try:
            yield
        finally:
            cls.instance = cls.run_id = None


def end_on_sigterm(say: Callable[[str], None]) -> None:
    """SIGTERM ends this process at once, the run it executes marked failed and its slots freed.

    Dagster's in-process execution replaces the signal's handler with one that only notes an
    interrupt, looked at between steps, so a run waiting for a pool slot ignored SIGTERM. Whatever
    Python handler is installed, the interpreter writes the signal's number to the wakeup file
    descriptor; a thread reading it acts on SIGTERM. Call from the main thread.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    _WAKEUP_SOCKETS.extend([reader, writer])
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def wait_for_sigterm() -> None:
        while signal.SIGTERM not in reader.recv(64):
            pass
        try:
            if CurrentRun.instance is not None and CurrentRun.run_id is not None:
                fail_run(CurrentRun.instance, CurrentRun.run_id, "Stopped by SIGTERM while it ran.")
                say(f"stopped by SIGTERM: run {CurrentRun.run_id} marked failed, its slots freed")
            else:
                say("stopped by SIGTERM")
        finally:
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait_for_sigterm, name="sigterm", daemon=True).start()


_WAKEUP_SOCKETS: list[socket.socket] = []  # kept open for the life of the process


def fail_run(instance: dg.DagsterInstance, run_id: str, why: str) -> None:
    """Mark a run failed (when it is not finished) and free the pool slots it held."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.status not in FINISHED:
        instance.report_run_failed(run, message=why)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def this_host() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class PoolHolder:
    run_id: str
    job_name: str
    step_key: str
    status: str


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _runs_here(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    host = run.tags.get(HOST_TAG)
    if host is not None:
        return host == this_host()
    return isinstance(instance.run_launcher, dg.DefaultRunLauncher)


# Events that the run's own processes write: the run worker (RUN_START) and each step's process.
# RUN_STARTING and RUN_ENQUEUED come from the launcher (the daemon or the webserver), which lives on.
RUN_PROCESS_EVENTS = {dg.DagsterEventType.RUN_START, dg.DagsterEventType.STEP_START}


def run_process_pids(entries: Iterable[dg.EventLogEntry]) -> set[int]:
    """The ids of the processes that ran a run, from its RUN_START and STEP_START events."""
    return {
        entry.dagster_event.pid
        for entry in entries
        if entry.dagster_event is not None
        and entry.dagster_event.event_type in RUN_PROCESS_EVENTS
        and entry.dagster_event.pid is not None
    }


def _event_pids(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    return run_process_pids(instance.all_logs(run_id, of_type=RUN_PROCESS_EVENTS))


def is_dead(instance: dg.DagsterInstance, run: dg.DagsterRun, now: float | None = None) -> bool:
    """Whether an in-progress run ran here and none of the processes that wrote its events lives."""
    if run.status not in IN_PROGRESS or not _runs_here(instance, run):
        return False
    pids = _event_pids(instance, run.run_id)
    if not pids:
        record = instance.get_run_record_by_id(run.run_id)
        created = record.create_timestamp.timestamp() if record else 0.0
        return (now or time.time()) - created > STARTING_GRACE_SECONDS
    return not any(process_alive(pid) for pid in pids)


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark the dead runs failed and free every pool slot held by a run that is not running.
    One line per run dealt with."""
    lines = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        if is_dead(instance, run):
            fail_run(instance, run.run_id, DEAD_RUN_MESSAGE)
            lines.append(
                f"run {run.run_id} ({run.job_name}) had no live process: marked failed, its slots freed"
            )
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.status in FINISHED:
                storage.free_concurrency_slots_for_run(run_id)
                status = run.status.value if run else "deleted"
                lines.append(f"run {run_id} ({status}) still held pool slots: freed")
    return lines


def pool_holders(instance: dg.DagsterInstance, pool: str) -> list[PoolHolder]:
    """The runs holding a pool's slots, with their job and status."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    holders = []
    for slot in storage.get_concurrency_info(pool).claimed_slots:
        run = instance.get_run_by_id(slot.run_id)
        holders.append(
            PoolHolder(
                slot.run_id,
                run.job_name if run else "?",
                slot.step_key,
                run.status.value if run else "deleted",
            )
        )
    return holders


def describe_wait(instance: dg.DagsterInstance, pool: str, waiting_run_id: str) -> str:
    """One line: what a run waiting for a pool waits for."""
    holders = [h for h in pool_holders(instance, pool) if h.run_id != waiting_run_id]
    if not holders:
        return f"run {waiting_run_id} waits for a slot of pool {pool}"
    held = ", ".join(f"run {h.run_id} ({h.job_name}, step {h.step_key}, {h.status})" for h in holders)
    return f"run {waiting_run_id} waits for pool {pool}, held by {held}"
