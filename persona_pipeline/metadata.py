"""Helpers that turn results into metadata a person reads in the UI."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import sqlalchemy as sa

MAX_CELL_CHARS = 80


def markdown_table(
    frame: pd.DataFrame, max_rows: int = 10, max_cell_chars: int = MAX_CELL_CHARS
) -> dg.MetadataValue:
    """A small markdown table (the UI renders it) of the first rows of `frame`."""
    if frame.empty:
        return dg.MetadataValue.md("_(none)_")
    shown = frame.head(max_rows).astype(object)
    cells = shown.where(shown.notna(), "").map(lambda value: _cell(_text(value), max_cell_chars))
    header = "| " + " | ".join(_cell(str(c), max_cell_chars) for c in shown.columns) + " |"
    rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
    body = ["| " + " | ".join(row) + " |" for row in cells.to_numpy().tolist()]
    more = [f"\n_{len(frame) - max_rows} more rows_"] if len(frame) > max_rows else []
    return dg.MetadataValue.md("\n".join([header, rule, *body, *more]))


def _text(value: object) -> str:
    """A cell's text; a float with at most 4 significant digits (a rate, not 0.30000000000000004)."""
    if isinstance(value, float | np.floating):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def rounded(value: float, digits: int = 4) -> dg.MetadataValue:
    """A float for the UI, to `digits` significant digits."""
    return dg.MetadataValue.float(float(f"{value:.{digits}g}"))


def _cell(text: str, max_chars: int) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def counts_table(counts: pd.Series, label: str, value_label: str = "rows") -> dg.MetadataValue:
    frame = counts.rename_axis(label).reset_index(name=value_label)
    return markdown_table(frame, max_rows=20)


def reject_share_check(
    check_name: str, share: float, threshold: float, rejected: int, read: int, where: str
) -> dg.AssetCheckResult:
    """Fails (ERROR) when more than `threshold` of the rows read were rejected."""
    passed = share <= threshold
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "reject_share": dg.MetadataValue.float(round(share, 5)),
            "threshold": dg.MetadataValue.float(threshold),
            "rows_rejected": dg.MetadataValue.int(rejected),
            "rows_read": dg.MetadataValue.int(read),
        },
        description=None if passed else f"{share:.1%} of rows rejected; see {where}",
    )


# Who answers for the assets: shown on every asset's page in the UI.
OWNERS = ["team:persona-data"]


def table_schema(table: sa.Table) -> dg.TableSchema:
    """A persona store table's columns as Dagster shows them (the column schema tab)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=column.name,
                type=str(column.type).lower(),
                description=column.comment,
                constraints=dg.TableColumnConstraints(nullable=bool(column.nullable)),
            )
            for column in table.columns
        ]
    )


def table_metadata(main: sa.Table, *others: sa.Table) -> dict[str, object]:
    """Definition metadata of an asset that writes `main` (its column schema) and `others`."""
    return {
        "dagster/column_schema": table_schema(main),
        "tables_written": ", ".join(table.name for table in (main, *others)),
    }


def add_counts_per_partition(context: dg.AssetExecutionContext, by_day: pd.DataFrame) -> None:
    """In a range run, give each partition's materialization its own counts (`by_day`: one row per
    partition key, one integer column per label); they replace the run's figures of the same label
    on that partition. A one-day run needs nothing: its figures are the day's."""
    if len(by_day) < 2:
        return
    for day, counts in by_day.iterrows():
        context.add_asset_metadata(
            {label: dg.MetadataValue.int(int(value)) for label, value in counts.items()},
            partition_key=str(day),
        )
