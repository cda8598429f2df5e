"""Running the chain through the Dagster instance the UI shows (used by `persona-pipeline run`)."""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg
import pandas as pd
import sqlalchemy as sa
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from persona_pipeline.cli import CommandError
from persona_pipeline.partitions import daily_partitions
from persona_pipeline.resources import LandingZone, PersonaStore, VectorIndex
from persona_pipeline.store.tables import (
    anomaly_scores,
    device_profiles,
    index_update_rejects,
    index_updates,
    segments,
)


@dataclass
class ChainResult:
    start: str
    end: str
    run_ids: dict[str, str]


def resolve_days(landing: LandingZone, start: str | None, end: str | None) -> tuple[str, str]:
    landed = landing.landed_days()
    if (start is None or end is None) and not landed:
        raise CommandError(
            f"no landed days under {landing.updates_root} and no --start/--end given "
            "(run `persona-pipeline generate` or drop files into index_updates/date=YYYY-MM-DD/)"
        )
    start = start or landed[0]
    end = end or landed[-1]
    if start > end:
        raise CommandError(f"--start {start} is after --end {end}")
    first = daily_partitions.get_first_partition_key()
    last = daily_partitions.get_last_partition_key()
    if start < first or end > last:
        raise CommandError(
            f"days {start} … {end} are outside the partitions {first} … {last} "
            "(set PERSONA_PARTITION_START for older data)"
        )
    return start, end


def _raise_if_failed(result: dg.ExecuteInProcessResult, job: str) -> None:
    if result.success:
        return
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            message = _root_message(event.step_failure_data.error)
            raise CommandError(f"{job} failed in {event.step_key}: {message} (run {result.run_id})")
    raise CommandError(f"{job} failed (run {result.run_id}); see the run in the Dagster UI")


def _root_message(error) -> str:
    """The innermost error's first line (a retried step wraps it in 'Exceeded max_retries')."""
    while error.cause is not None:
        error = error.cause
    lines = error.message.strip().splitlines()
    return lines[0] if lines else error.cls_name or "unknown error"


def run_chain(
    start: str | None,
    end: str | None,
    verbose: bool = False,
    instance: dg.DagsterInstance | None = None,
) -> ChainResult:
    from persona_pipeline.definitions import defs

    start, end = resolve_days(defs.resources["landing_zone"], start, end)
    instance = instance or dg.DagsterInstance.get()
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "WARNING"}}}}
    range_tags = {ASSET_PARTITION_RANGE_START_TAG: start, ASSET_PARTITION_RANGE_END_TAG: end}
    run_ids = {}
    for job_name, tags in (("ingest_job", range_tags), ("personas_job", {}), ("segments_job", {})):
        job = defs.resolve_job_def(job_name)
        result = job.execute_in_process(
            instance=instance,
            tags={**tags, "persona/launched_by": "cli"},
            run_config=run_config,
            raise_on_error=False,
        )
        _raise_if_failed(result, job_name)
        run_ids[job_name] = result.run_id
    return ChainResult(start, end, run_ids)


def summary(result: ChainResult) -> str:
    from persona_pipeline.definitions import defs

    store: PersonaStore = defs.resources["persona_store"]
    index: VectorIndex = defs.resources["vector_index"]
    days = [day.strftime("%Y-%m-%d") for day in pd.date_range(result.start, result.end, freq="D")]
    with store.engine.connect() as connection:
        accepted = connection.execute(
            sa.select(sa.func.count()).where(index_updates.c.partition_date.in_(days))
        ).scalar()
        reasons = connection.execute(
            sa.select(index_update_rejects.c.reason_code, sa.func.count())
            .where(index_update_rejects.c.partition_date.in_(days))
            .group_by(index_update_rejects.c.reason_code)
            .order_by(sa.func.count().desc())
        ).all()
        devices = connection.execute(
            sa.select(sa.func.count(sa.distinct(device_profiles.c.device_id)))
        ).scalar()
        active_segments = connection.execute(
            sa.select(segments.c.cluster_id, segments.c.name, segments.c.devices)
            .where(segments.c.active)
            .order_by(segments.c.cluster_id)
        ).all()
        flagged = connection.execute(
            sa.select(sa.func.count()).select_from(anomaly_scores).where(anomaly_scores.c.is_anomaly)
        ).scalar()
        strangest = connection.execute(
            sa.select(anomaly_scores.c.device_id, anomaly_scores.c.reason)
            .order_by(anomaly_scores.c.score.desc())
            .limit(1)
        ).first()
    rejected = sum(count for _, count in reasons)
    with index.client() as client:
        collection = index.alias_target(client)
        points = client.count(index.alias, exact=True).count if collection else 0
    top_reasons = ", ".join(f"{code} {count}" for code, count in reasons[:4]) or "none"
    return "\n".join(
        [
            f"persona_pipeline: days {result.start} … {result.end}",
            f"  updates accepted   {accepted:>10,}",
            f"  updates rejected   {rejected:>10,}   ({top_reasons})",
            f"  devices profiled   {devices:>10,}",
            f"  vectors in Qdrant  {points:>10,}   (alias {index.alias} -> {collection})",
            f"  segments           {len(active_segments):>10,}",
            *[
                f"    {cluster_id:>4}  {count:>7,} devices  {name}"
                for cluster_id, name, count in active_segments
            ],
            f"  anomalies          {flagged:>10,}   ({flagged / max(devices, 1):.1%} of devices)",
            *([f"    strangest: {strangest.device_id}: {strangest.reason}"] if strangest else []),
            "",
            "Where to look next:",
            "  make dev         Dagster UI on http://127.0.0.1:3000: these runs, assets, lineage",
            f"  persona store    {store.display_url}",
            "                   (index_updates, index_update_rejects, device_profiles, persona_vectors,",
            "                    device_clusters, segments, anomaly_scores)",
            f"  vector index     {index.location}",
        ]
    )
