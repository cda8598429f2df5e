"""Running the chain through the Dagster instance the UI shows (used by `persona-pipeline run`)."""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd
import sqlalchemy as sa

from persona_pipeline import settings
from persona_pipeline.anomalies.storage import flags_by_kind, read_strangest
from persona_pipeline.app.home import CommandError, say_on_stderr, write_failure_log
from persona_pipeline.executors import distributed
from persona_pipeline.feedback.jobs import feedback_job, weights_job
from persona_pipeline.feedback.sensors import unloaded_feedback_batches
from persona_pipeline.feedback.storage import (
    acceptance_by_weights_version,
    read_held_batches,
    read_weight_decisions,
)
from persona_pipeline.ingest import storage as ingest_storage
from persona_pipeline.ingest.jobs import ingest_job
from persona_pipeline.offers.jobs import DECISION_JOBS, clusters_job
from persona_pipeline.offers.storage import offers_by_trigger, tickets_by_status
from persona_pipeline.partitions import (
    DEVICE_SHARDS,
    device_day_keys,
    device_shard_keys,
    offer_feedback_batches,
    outside_partitions,
)
from persona_pipeline.personas.jobs import personas_job
from persona_pipeline.personas.storage import profile_counts
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.run_health import (
    HOST_TAG,
    CurrentRun,
    describe_wait,
    reap_dead_runs,
    this_host,
)
from persona_pipeline.secrets import mask_url
from persona_pipeline.segments.storage import read_segment_registry, segment_sizes
from persona_pipeline.store.tables import (
    offer_feedback,
    service_recommendations,
)

# The UI lists a job's runs by this label (repository @ code location, as workspace.yaml names
# it); Dagster sets it on the runs it launches, and runs executed here carry it too.
CODE_LOCATION_TAGS = {".dagster/repository": "__repository__@persona_pipeline"}
# Dagster's run tags for a partition and for a run over a range of partitions (a backfill's).
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
SIGBUS_EXIT = re.compile(r"exited with code (-7|135)\b|signal 7\b|SIGBUS")
SIGKILL_EXIT = re.compile(r"exited with code (-9|137)\b|signal 9\b")


@dataclass
class ChainResult:
    start: str
    end: str
    run_ids: dict[str, str]
    feedback_batches: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)


@dataclass
class DayRange:
    """The days a run covers, and one line per landing folder it leaves out and why."""

    start: str
    end: str
    skipped: list[str] = field(default_factory=list)


def resolve_days(landing: LandingZone, start: str | None, end: str | None) -> DayRange:
    """The range to run: the given days, or every landed day inside the partitions. Landed
    folders outside the partitions are left out of a default run and named in `skipped`."""
    for label, day in (("--start", start), ("--end", end)):
        problem = day and outside_partitions(day)
        if problem:
            raise CommandError(f"{label} {day} {problem}")
    landed = landing.landed_days()
    skipped = [
        f"landing folder date={day} {problem}: skipped"
        for day in landed
        if (problem := outside_partitions(day))
    ]
    usable = [day for day in landed if outside_partitions(day) is None]
    if (start is None or end is None) and not usable:
        if skipped:
            raise CommandError("no landed day inside the partitions: " + "; ".join(skipped))
        raise CommandError(
            f"no landed days under {landing.shown}/index_updates and no --start/--end given "
            "(run `persona-pipeline generate` or drop files into index_updates/date=YYYY-MM-DD/)"
        )
    start = start or usable[0]
    end = end or usable[-1]
    if start > end:
        raise CommandError(f"--start {start} is after --end {end}")
    return DayRange(start, end, skipped)


def _execute_out_of_process(
    job_name: str,
    instance: dg.DagsterInstance,
    tags: dict[str, str],
    run_config: dict,
    partition_key: str | None,
) -> dg.JobExecutionResult:
    """Run a job with the Definitions' executor (Celery): this process orchestrates and the
    workers rebuild the job from this module path, as they would for a run launched by the UI."""
    job = dg.build_reconstructable_job("persona_pipeline.definitions", "job_named", (job_name,))
    if partition_key is not None:
        tags = {**tags, PARTITION_TAG: partition_key}
    return dg.execute_job(job, instance=instance, tags=tags, run_config=run_config)


def _raise_if_failed(result: dg.ExecuteInProcessResult | dg.JobExecutionResult, job: str) -> None:
    """One line naming the failed step and its innermost error; the whole error of every failed
    step goes to a log file under $PERSONA_HOME/logs that the line names."""
    if result.success:
        return
    failures = [
        event
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error
    ]
    log = write_failure_log(
        f"{job}-{result.run_id}",
        "\n\n".join(f"step {e.step_key}:\n{e.step_failure_data.error.to_string()}" for e in failures),
    )
    where = f"run {result.run_id}" + (f"; details in {log}" if log else "")
    if failures:
        message = _root_message(failures[0].step_failure_data.error)
        raise CommandError(f"{job} failed in {failures[0].step_key}: {message} ({where})")
    raise CommandError(f"{job} failed ({where})")


def _root_message(error) -> str:
    """The innermost error's first line (a retried step wraps it in 'Exceeded max_retries'),
    credentials masked, with what a crash of the step's process most likely means."""
    while error.cause is not None:
        error = error.cause
    lines = error.message.strip().splitlines()
    message = mask_url(lines[0] if lines else error.cls_name or "unknown error")
    return message + _crash_hint(message)


def _crash_hint(message: str) -> str:
    """A step process killed by a signal says only its exit code; name the likely cause."""
    if SIGBUS_EXIT.search(message):
        home = settings.persona_home()
        free = shutil.disk_usage(home).free if home.exists() else None
        full = f", and the disk holding {home} has {free // 2**20} MiB free" if free is not None else ""
        return f" (SIGBUS: a memory-mapped file could not be written, usually because its disk is full{full})"
    if SIGKILL_EXIT.search(message):
        return " (SIGKILL: killed from outside, often by the kernel when memory ran out)"
    return ""


def failed_error_checks(result: dg.ExecuteInProcessResult | dg.JobExecutionResult) -> list[str]:
    """One line per asset check of ERROR severity that did not pass in a run."""
    return [
        f"check {evaluation.check_name} on {evaluation.asset_key.to_user_string()} failed "
        f"(run {result.run_id}): {_check_description(evaluation)}"
        for evaluation in result.get_asset_check_evaluations()
        if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    ]


def _check_description(evaluation: dg.AssetCheckEvaluation) -> str:
    description = evaluation.description or ""
    return description.strip().splitlines()[0] if description.strip() else "see the check in the Dagster UI"


@contextmanager
def reporting_waits(
    instance: dg.DagsterInstance, run_id: str, say: Callable[[str], None], every_seconds: float = 10.0
) -> Iterator[None]:
    """While a run executes, say when it waits for a pool slot and which runs hold the pool."""
    stop = threading.Event()

    def watch() -> None:
        said = ""
        while not stop.wait(every_seconds):
            try:
                waits = [
                    describe_wait(instance, pool, run_id)
                    for pool in instance.event_log_storage.get_concurrency_keys()
                    if run_id in instance.event_log_storage.get_concurrency_info(pool).pending_run_ids
                ]
            except Exception:  # a report is not worth failing the run for
                continue
            line = "; ".join(waits)
            if line and line != said:
                say(line + " (a run whose process is gone is freed by the next `persona-pipeline run`)")
            said = line

    watcher = threading.Thread(target=watch, name=f"wait-reporter-{run_id}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=every_seconds)


def run_chain(
    start: str | None,
    end: str | None,
    verbose: bool = False,
    instance: dg.DagsterInstance | None = None,
    say: Callable[[str], None] = say_on_stderr,
    progress: Callable[[str], None] | None = None,
) -> ChainResult:
    """The chain for the days `start` … `end` (default: every landed day), job after job. `say`
    gets what a person must know (a slot held by a dead run); `progress`, when given, a line per
    finished job with its time."""
    from persona_pipeline.definitions import build_resources, defs

    resources = build_resources(resolved=True)
    landing: LandingZone = resources["landing_zone"]
    store: PersonaStore = resources["persona_store"]
    days = resolve_days(landing, start, end)
    start, end = days.start, days.end
    instance = instance or dg.DagsterInstance.get()
    # Without --verbose the terminal shows the one-line reasons and the summary; the whole error
    # of a failed step goes to a log file (see _raise_if_failed) and stays in the run's events.
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "CRITICAL"}}}}
    range_tags = {RANGE_START_TAG: start, RANGE_END_TAG: end}
    run_ids = {}
    failed_checks: list[str] = []

    def run(job_name: str, tags: dict[str, str], partition_key: str | None = None) -> None:
        started = time.monotonic()
        for line in reap_dead_runs(instance):
            say(line)
        tags = {**tags, "persona/launched_by": "cli", HOST_TAG: this_host(), **CODE_LOCATION_TAGS}
        if distributed() and not instance.is_ephemeral:  # workers cannot open an ephemeral instance
            result = _execute_out_of_process(job_name, instance, tags, run_config, partition_key)
        else:
            run_id = str(uuid.uuid4())
            with reporting_waits(instance, run_id, say), CurrentRun.executing(instance, run_id):
                result = defs.resolve_job_def(job_name).execute_in_process(
                    instance=instance,
                    tags=tags,
                    run_config=run_config,
                    partition_key=partition_key,
                    raise_on_error=False,
                    run_id=run_id,
                )
        _raise_if_failed(result, job_name)
        failed_checks.extend(failed_error_checks(result))
        run_ids[job_name if partition_key is None else f"{job_name}[{partition_key}]"] = result.run_id
        if progress is not None:
            what = job_name if partition_key is None else f"{job_name} {partition_key}"
            progress(f"  {what} done in {time.monotonic() - started:.0f} s")

    if DEVICE_SHARDS == 1:
        run(ingest_job.name, range_tags)
    else:  # one run per (day, shard), shard after shard: the workers of a backfill run them side by side
        for day in pd.date_range(start, end, freq="D").strftime("%Y-%m-%d"):
            for key in device_day_keys(day):
                run(ingest_job.name, {}, partition_key=key)
    batches = unloaded_feedback_batches(landing, instance)
    if batches:
        instance.add_dynamic_partitions(offer_feedback_batches.name, batches)
    # Without a new batch, a load still retries the rows held for offers not made yet (the last
    # run's offers may have made them); one batch's run retries every batch's held rows.
    held = read_held_batches(store)
    retry = [] if batches or held.empty else [str(held.sort_values("hold_until")["batch_id"].iloc[0])]
    for batch in batches + retry:
        run(feedback_job.name, {}, partition_key=batch)
    if batches or retry or DEVICE_SHARDS > 1:
        run(weights_job.name, {})  # the day's vectors use the refreshed weights
    for key in device_shard_keys():  # one run, or a run per device shard
        run(personas_job.name, {}, partition_key=key)
    for job in DECISION_JOBS:
        for key in device_shard_keys() if job is clusters_job else [None]:
            run(job.name, {}, partition_key=key)
    return ChainResult(start, end, run_ids, batches, days.skipped, failed_checks)


class NothingToAnswer(CommandError):
    """Every offer made so far has a response."""


def simulate_feedback(seed: int, batch_id: str | None) -> str:
    """Write a feedback batch answering every offer not answered yet, as the demo's people would."""
    from persona_pipeline.definitions import build_resources
    from persona_pipeline.demo.responses import simulate_responses, write_feedback_batch
    from persona_pipeline.settings import ground_truth_dir

    resources = build_resources(resolved=True)
    store: PersonaStore = resources["persona_store"]
    landing: LandingZone = resources["landing_zone"]
    config: PersonaConfig = resources["persona_config"]
    truth_file = ground_truth_dir() / "devices.csv"
    if not truth_file.is_file():
        raise CommandError(f"no ground truth at {truth_file}: run `persona-pipeline generate` first")
    r, f = service_recommendations.c, offer_feedback.c
    offers = store.read_frame(
        sa.select(r.offer_id, r.device_id, r.service_id, r.trigger, r.offer_day).where(
            ~sa.exists().where(f.offer_id == r.offer_id)
        )
    )
    if offers.empty:
        raise NothingToAnswer("no unanswered offers: run `persona-pipeline run` first")
    responses = simulate_responses(offers, pd.read_csv(truth_file), config.service_catalog(), seed)
    batch_id = batch_id or f"sim-{offers['offer_day'].max()}-{len(landing.complete_feedback_batches()) + 1}"
    folder = write_feedback_batch(responses, landing.root, batch_id)
    accepted = responses["response"].isin(["accepted", "used"]).mean()
    return f"feedback batch {batch_id}: {len(responses)} responses ({accepted:.0%} accepting) in {folder}"


def _acceptance_lines(acceptance: pd.DataFrame) -> list[str]:
    answered = acceptance[acceptance["answered"] > 0]
    if answered.empty:
        return ["  acceptance         no feedback yet (try `persona-pipeline simulate-feedback`, then `run`)"]
    return ["  acceptance by the weights version behind the offer (other days, other devices):"] + [
        f"    weights v{int(row.weights_version):<3} {int(row.accepted):>6,} of "
        f"{int(row.answered):>6,} answered offers accepted ({row.acceptance_rate:.1%})"
        for row in answered.itertuples()
    ]


RETIRED_SHOWN = 5  # retired segment ids the summary lists, the most recent first


def _decision_lines(decisions: pd.DataFrame) -> list[str]:
    """One line per candidate weights version: the gate's decision and why."""
    if decisions.empty:
        return []
    return ["  weights gate (each refresh's candidate; the live version is the newest accepted):"] + [
        f"    v{int(row.candidate_version):<3} {row.decision:<8} {row.reason}"
        for row in decisions.itertuples()
    ]


NO_REASON = "before reasons were kept"  # a segment retired before revision 0007


def summary(result: ChainResult) -> str:
    from persona_pipeline.definitions import build_resources

    resources = build_resources(resolved=True)
    store: PersonaStore = resources["persona_store"]
    index: VectorIndex = resources["vector_index"]
    days = [day.strftime("%Y-%m-%d") for day in pd.date_range(result.start, result.end, freq="D")]
    accepted = ingest_storage.count_accepted(store, days)
    reasons = ingest_storage.rejects_by_reason(store, days)
    devices = profile_counts(store)[1]
    registry = read_segment_registry(store)
    registry["devices"] = registry["cluster_id"].map(segment_sizes(store)).fillna(0).astype("int64")
    active_segments = registry[registry["active"]].sort_values("cluster_id")
    retired = (
        registry[~registry["active"]]
        .sort_values(["last_seen_at", "cluster_id"], ascending=[False, True])
        .head(RETIRED_SHOWN)
    )
    flagged_by_kind = flags_by_kind(store)
    tickets = tickets_by_status(store)
    strangest = read_strangest(store)
    offers = offers_by_trigger(store)
    acceptance = acceptance_by_weights_version(store)
    flagged = sum(count for _, count in flagged_by_kind)
    rejected = sum(count for _, count in reasons)
    with index.open() as vectors:
        collection = vectors.alias_target(index.alias)
        points = vectors.count(collection) if collection else 0
    top_reasons = ", ".join(f"{code} {count}" for code, count in reasons[:4]) or "none"
    return "\n".join(
        [
            f"persona_pipeline: days {result.start} … {result.end}",
            *[f"  ! {line}" for line in result.skipped],
            f"  updates accepted   {accepted:>10,}",
            f"  updates rejected   {rejected:>10,}   ({top_reasons})",
            f"  devices profiled   {devices:>10,}",
            f"  vectors in Qdrant  {points:>10,}   (alias {index.alias} -> {collection})",
            f"  segments           {len(active_segments):>10,}",
            *[
                f"    {cluster_id:>4}  {count:>7,} devices  {name}"
                for cluster_id, name, count in active_segments[["cluster_id", "name", "devices"]].itertuples(
                    index=False
                )
            ],
            *[
                f"    retired {cluster_id:>4}  {name}: {reason if isinstance(reason, str) else NO_REASON} "
                f"(last seen {pd.Timestamp(seen):%Y-%m-%d %H:%M})"
                for cluster_id, name, seen, reason in retired[
                    ["cluster_id", "name", "last_seen_at", "retired_reason"]
                ].itertuples(index=False)
            ],
            f"  anomalies          {flagged:>10,}   ({flagged / max(devices, 1):.1%} of devices; "
            + (", ".join(f"{count:,} {kind or 'no kind'}" for kind, count in flagged_by_kind) or "none")
            + ")",
            f"  support tickets    {tickets.get('open', 0):>10,}   open, "
            f"{tickets.get('resolved', 0):,} resolved",
            *([f"    strangest: {strangest[0]}: {strangest[1]}"] if strangest else []),
            f"  offers made        {sum(n for _, n in offers):>10,}   ("
            + (", ".join(f"{trigger} {n:,}" for trigger, n in offers) or "none")
            + ")",
            f"  feedback batches   {len(result.feedback_batches):>10,}   processed in this run"
            + (f": {', '.join(result.feedback_batches)}" if result.feedback_batches else ""),
            *_acceptance_lines(acceptance),
            *_decision_lines(read_weight_decisions(store)),
            "",
            "Where to look next:",
            "  make dev         Dagster UI on http://127.0.0.1:3000: these runs, assets, lineage",
            f"  persona store    {store.display_url}",
            "                   (index_update_rejects, device_profiles, persona_vectors,",
            "                    device_clusters, segments, anomaly_scores, service_recommendations,",
            "                    support_tickets, offer_feedback, key_weights)",
            f"  update history   {store.history.shown}   (the accepted updates, Parquet per day)",
            f"  vector index     {index.location}",
        ]
    )
