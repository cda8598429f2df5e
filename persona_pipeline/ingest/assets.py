"""Ingest: raw index updates from the landing zone, validated, with rejects kept."""

import dagster as dg
import pandas as pd
from pydantic import Field

from persona_pipeline.erasure.storage import read_suppression
from persona_pipeline.erasure.subjects import Suppression
from persona_pipeline.ingest import reporting
from persona_pipeline.ingest.ingest import ingest_days
from persona_pipeline.ingest.reporting import REJECT_SHARE_CHECK
from persona_pipeline.ingest.storage import count_day_rejects, rejects_replaced
from persona_pipeline.ingest.validation import DEFAULT_MAX_LATE_DAYS
from persona_pipeline.metadata import OWNERS, add_counts_per_partition
from persona_pipeline.partitions import device_day_backfill, device_day_partitions, run_days_and_shard
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.store.tables import index_update_rejects


class IndexUpdatesConfig(dg.Config):
    max_reject_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="The reject-share check fails when more than this share of rows read is rejected.",
    )
    max_late_days: float = Field(
        default=DEFAULT_MAX_LATE_DAYS,
        ge=0,
        description="Rows observed more than this many days before their partition day are rejected "
        "(too_late); later ones within the bound are accepted and counted as late_rows.",
    )


def _unsuppressed(frame: pd.DataFrame, suppression: Suppression) -> pd.DataFrame:
    """The rows of devices and customers not erased (the frame itself when none is: a day of
    updates is not copied for nothing)."""
    suppressed = suppression.matches(frame)
    return frame[~suppressed] if suppressed.any() else frame


@dg.asset(
    owners=OWNERS,
    metadata=reporting.definition_metadata(),
    partitions_def=device_day_partitions,
    backfill_policy=device_day_backfill,
    group_name="ingest",
    kinds={"pandas", "parquet", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            REJECT_SHARE_CHECK,
            asset="index_updates",
            description="Share of rejected rows stays within the configured threshold (default 5%).",
        )
    ],
)
def index_updates(
    context: dg.AssetExecutionContext,
    config: IndexUpdatesConfig,
    landing_zone: LandingZone,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """Device key-value updates of each day, validated against the contract and the feature
    schema. Good rows go to the update history (Parquet files per day and shard), bad ones to
    `index_update_rejects` with a reason; exact duplicates are dropped. Re-running a day replaces
    that day's files and rows. With device shards, a run of a (day, shard) reads the day's files
    and keeps its shard's devices: it writes that shard's file and replaces that shard's rejects."""
    days, shard = run_days_and_shard(context)
    schema = persona_config.feature_schema()
    outcome = ingest_days(days, landing_zone.read_day_files, schema, config.max_late_days, shard)
    folder_problems = landing_zone.updates_folder_problems()
    for problem in folder_problems:
        context.log.warning(problem)
    for problem in outcome.problems:
        context.log.info(problem)

    suppression = read_suppression(persona_store)
    accepted, rejects = (_unsuppressed(frame, suppression) for frame in (outcome.accepted, outcome.rejects))
    suppressed_rows = len(outcome.accepted) - len(accepted) + len(outcome.rejects) - len(rejects)
    if suppressed_rows:
        context.log.info(f"{suppressed_rows} rows of erased devices or customers dropped (suppression list)")
    rejects = rejects.assign(
        rejected_at=pd.Timestamp.now(tz="UTC"),
        device_shard=shard.index if shard else 0,
        device_shards=shard.count if shard else 1,
    )
    if shard is None:
        persona_store.history.write_days(days, accepted)
    else:
        persona_store.history.write_shard(days, shard, accepted)
    persona_store.replace_rows(index_update_rejects, rejects_replaced(days, shard), rejects)
    day_rejected = None if shard is None else count_day_rejects(persona_store, days, shard.count)

    by_day = reporting.per_day_counts(days, accepted, rejects)
    add_counts_per_partition(context, by_day)
    return dg.MaterializeResult(
        metadata=reporting.updates_metadata(
            days=days,
            outcome=outcome,
            accepted=accepted,
            rejects=rejects,
            by_day=by_day,
            suppressed_rows=suppressed_rows,
            folder_problems=folder_problems,
            day_rejected=day_rejected,
        ),
        check_results=[reporting.reject_check(outcome, rejects, config.max_reject_share, day_rejected)],
    )
