"""The metadata and check results index_updates shows in the UI."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from persona_pipeline.ingest.ingest import IngestOutcome
from persona_pipeline.metadata import counts_table, markdown_table, reject_share_check, table_metadata
from persona_pipeline.resources.update_history import SCHEMA as HISTORY_SCHEMA
from persona_pipeline.store.tables import index_update_rejects

REJECT_SHARE_CHECK = "reject_share_within_threshold"


def definition_metadata() -> dict[str, object]:
    """The update history's columns (what the asset mainly writes) and the table it writes."""
    return {
        **table_metadata(index_update_rejects),
        "dagster/column_schema": dg.TableSchema(
            columns=[
                dg.TableColumn(
                    name=field.name,
                    type=str(field.type),
                    constraints=dg.TableColumnConstraints(nullable=field.nullable),
                )
                for field in HISTORY_SCHEMA
            ]
        ),
        "files_written": "update history: index_updates/date=YYYY-MM-DD/shard=N/part-0.parquet",
    }


def per_day_counts(days: list[str], accepted: pd.DataFrame, rejects: pd.DataFrame) -> pd.DataFrame:
    """Rows accepted and rejected per partition day (index: day), zeros for a day without rows."""
    return pd.DataFrame(
        {
            "rows_accepted": accepted["partition_date"].value_counts().reindex(days, fill_value=0),
            "rows_rejected": rejects["partition_date"].value_counts().reindex(days, fill_value=0)
            if "partition_date" in rejects
            else 0,
        },
        index=pd.Index(days, name="day"),
    ).astype(int)


def updates_metadata(
    *,
    days: list[str],
    outcome: IngestOutcome,
    accepted: pd.DataFrame,
    rejects: pd.DataFrame,
    by_day: pd.DataFrame,
    suppressed_rows: int,
    folder_problems: list[str],
    day_rejected: int | None = None,
) -> dict[str, dg.MetadataValue]:
    """The days ingested: rows read, accepted (`accepted`, per day in `by_day`) and rejected
    (`rejects`), what validation noticed, the rows of erased subjects dropped, and a preview."""
    return {
        "days": dg.MetadataValue.text(f"{days[0]} … {days[-1]}" if len(days) > 1 else days[0]),
        "rows_read": dg.MetadataValue.int(outcome.rows_read),
        "rows_accepted": dg.MetadataValue.int(len(accepted)),
        "rows_by_day": markdown_table(by_day.reset_index(), max_rows=len(days)),
        "rows_rejected": dg.MetadataValue.int(len(rejects)),
        "reject_share": dg.MetadataValue.float(round(outcome.reject_share, 5)),
        "duplicates_dropped": dg.MetadataValue.int(outcome.duplicates_dropped),
        "suppressed_rows": dg.MetadataValue.int(suppressed_rows),
        "devices": dg.MetadataValue.int(int(accepted["device_id"].nunique())),
        "keys": dg.MetadataValue.int(int(accepted["key"].nunique())),
        "unknown_key_rows": dg.MetadataValue.int(outcome.unknown_key_rows),
        "unknown_keys": dg.MetadataValue.text(", ".join(sorted(outcome.unknown_keys)) or "none"),
        "late_rows": dg.MetadataValue.int(outcome.late_rows),
        "rejects_by_reason": counts_table(
            rejects["reason_code"].value_counts() if not rejects.empty else pd.Series(dtype=int),
            "reason",
        ),
        "reject_examples": markdown_table(
            rejects.drop_duplicates("reason_code")[["source_file", "source_row", "reason"]]
            if not rejects.empty
            else rejects
        ),
        "file_notes": dg.MetadataValue.text("\n".join(outcome.problems) or "none"),
        "folder_problems": dg.MetadataValue.text("\n".join(folder_problems) or "none"),
        "preview": markdown_table(accepted.head(5).drop(columns=["source_file", "source_row"])),
        # On a device shard the check judges the day: its rows, and its rejects over the shards so far.
        **(
            {
                "day_rows_read": dg.MetadataValue.int(outcome.day_rows_read),
                "day_rows_rejected": dg.MetadataValue.int(day_rejected),
            }
            if day_rejected is not None
            else {}
        ),
    }


def reject_check(
    outcome: IngestOutcome, rejects: pd.DataFrame, max_reject_share: float, day_rejected: int | None = None
) -> dg.AssetCheckResult:
    """Fails when more than `max_reject_share` of the rows read were rejected. On a device shard
    (`day_rejected`: the day's rejects stored by its shards so far, this one's included) the share
    is of the day's rows: rejects of one device, or rows without a device id, all fall in one
    shard, so a shard's own share says little of the day. It grows as the shards run and is the
    day's once all have."""
    if day_rejected is None:
        share, rejected, read = outcome.reject_share, len(rejects), outcome.rows_read
    else:
        read, rejected = outcome.day_rows_read, day_rejected
        share = rejected / read if read else 0.0
    return reject_share_check(
        REJECT_SHARE_CHECK, share, max_reject_share, rejected, read, "index_update_rejects"
    )
