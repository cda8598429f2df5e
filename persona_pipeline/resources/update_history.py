"""The history of accepted updates: each day's accepted index updates as Parquet files beside
the persona store (docs/contracts.md, "The update history"). This module owns the layout; the
index_updates asset is its one writer, and erasure rewrites files without an erased subject's rows.

    <root>/index_updates/date=YYYY-MM-DD/shard=N/part-0.parquet

A device's rows are in shard `stable_hash(device_id) % shards`. Every file is written to a
temporary name and renamed over the old one, so a reader sees a day's file before or after a
write, never half of one; writing a day again replaces its files (and removes shards a smaller
shard count no longer uses).
"""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from persona_pipeline.device_shards import DeviceShard, shard_of

UPDATES_FOLDER = "index_updates"
PART_NAME = "part-0.parquet"
LOCK_NAME = ".lock"
DAY_FOLDER = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
SHARD_FOLDER = re.compile(r"^shard=(\d+)$")
# Rows of one row group: files are sorted by key, so a read of one key skips the groups of others.
ROW_GROUP_ROWS = 128 * 1024

SCHEMA = pa.schema(
    [
        pa.field("partition_date", pa.string(), nullable=False),
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("customer_id", pa.string()),
        pa.field("key", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("value_number", pa.float64()),
        pa.field("observed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
_HELD: set[Path] = set()  # the histories whose lock this process holds


class HistoryError(dg.Failure):
    """A file of the update history cannot be read, or is not one this pipeline wrote: one line
    naming it. Trying again cannot help, so a run's step is not retried."""

    def __init__(self, message: str) -> None:
        super().__init__(description=message, allow_retries=False)

    def __str__(self) -> str:
        return self.description or ""


@dataclass(frozen=True)
class UpdateHistory:
    """The history under `root`, written in `shards` shards per day."""

    root: Path
    shards: int = 1

    @property
    def folder(self) -> Path:
        return self.root / UPDATES_FOLDER

    def day_folder(self, day: str) -> Path:
        return self.folder / f"date={day}"

    # Writing ----------------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the history's lock (across processes on the machine or the shared volume): an
        erasure's rewrite of a file must not put back rows an ingest of the day just replaced.
        Taken again inside itself, in the same process, it is already held."""
        if self.folder in _HELD:
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_NAME, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _HELD.add(self.folder)
            try:
                yield
            finally:
                _HELD.discard(self.folder)
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write_days(self, days: Sequence[str], accepted: pd.DataFrame) -> int:
        """Replace the files of `days` with `accepted`'s rows (those of a day without rows go);
        rows written."""
        table = as_history_table(accepted)
        rows = table.num_rows
        dates = table.column("partition_date")
        with self.exclusive():
            if len(days) == 1 and pc.all(pc.equal(dates, days[0])).as_py() is not False:
                # One day's rows, the usual run: no filtered copy of a day that may be 10M rows.
                del dates
                self._replace_day(days[0], table)
                return rows
            for day in days:
                self._replace_day(day, table.filter(pc.equal(dates, day)))
        return rows

    def write_shard(self, days: Sequence[str], shard: DeviceShard, accepted: pd.DataFrame) -> int:
        """Replace the files of `shard` on `days` with `accepted`'s rows (every one the shard's);
        rows written. Files of shards the count no longer has go."""
        if shard.count != self.shards:
            raise HistoryError(
                f"device shard {shard.index} of {shard.count}: the update history at {self.folder} "
                f"keeps {self.shards} shards per day"
            )
        table = as_history_table(accepted)
        outside = ~shard.holds(accepted["device_id"]) if len(accepted) else np.zeros(0, dtype=bool)
        if outside.any():
            raise HistoryError(f"{int(outside.sum())} rows given for shard {shard.index} are another shard's")
        dates = table.column("partition_date")
        elsewhere = pc.sum(pc.invert(pc.is_in(dates, value_set=pa.array(list(days), pa.string())))).as_py()
        if elsewhere:
            raise HistoryError(f"{elsewhere} rows given for {', '.join(days)} are of another day")
        with self.exclusive():
            for day in days:
                rows = table.filter(pc.equal(dates, day)) if len(days) > 1 else table
                path = self.day_folder(day) / f"shard={shard.index}" / PART_NAME
                if rows.num_rows:
                    self._write_file(path, _in_key_order(rows))
                else:
                    path.unlink(missing_ok=True)
                for other in self._day_files(self.day_folder(day)):
                    if _shard_number(other) >= shard.count:
                        other.unlink()
        return table.num_rows

    def _replace_day(self, day: str, table: pa.Table) -> None:
        """The day's files become `table`'s rows, one file per shard that has rows."""
        folder = self.day_folder(day)
        if self.shards == 1:
            by_shard = {0: table} if table.num_rows else {}
        else:
            numbers = shard_of(table.column("device_id").to_pandas(), self.shards)
            by_shard = {
                shard: table.filter(pa.array(numbers == shard)) for shard in np.unique(numbers).tolist()
            }
        for shard, rows in by_shard.items():
            self._write_file(folder / f"shard={shard}" / PART_NAME, _in_key_order(rows))
        written = set(by_shard)
        for path in self._day_files(folder):
            if _shard_number(path) not in written:
                path.unlink()

    def _write_file(self, path: Path, table: pa.Table) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(table, temporary, row_group_size=ROW_GROUP_ROWS, compression="zstd")
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    # Reading ----------------------------------------------------------------------------------

    def days(self) -> list[str]:
        """The days the history holds files of, oldest first."""
        if not self.folder.is_dir():
            return []
        found = (DAY_FOLDER.match(entry.name) for entry in self.folder.iterdir() if entry.is_dir())
        return sorted(match.group(1) for match in found if match)

    def files(self, days: Iterable[str] | None = None, shard: int | None = None) -> list[Path]:
        """The Parquet files of `days` (every day when None), of one shard or all."""
        chosen = self.days() if days is None else days
        return [path for day in chosen for path in self._day_files(self.day_folder(day), shard)]

    @staticmethod
    def _day_files(folder: Path, shard: int | None = None) -> list[Path]:
        if not folder.is_dir():
            return []
        files = sorted(
            entry / PART_NAME
            for entry in folder.iterdir()
            if SHARD_FOLDER.match(entry.name) and (entry / PART_NAME).is_file()
        )
        return files if shard is None else [path for path in files if _shard_number(path) == shard]

    def read(
        self,
        days: Iterable[str] | None = None,
        columns: Sequence[str] = COLUMNS,
        where: ds.Expression | None = None,
        shard: int | None = None,
    ) -> pd.DataFrame:
        """The rows of `days` (every day when None) that match `where`, only `columns`; of one
        shard's files or all."""
        table = self.read_table(days, columns, where, shard)
        frame = table.to_pandas()
        if "observed_at" in frame.columns:
            frame["observed_at"] = frame["observed_at"].astype("datetime64[us, UTC]")
        return frame

    def read_table(
        self,
        days: Iterable[str] | None = None,
        columns: Sequence[str] = COLUMNS,
        where: ds.Expression | None = None,
        shard: int | None = None,
    ) -> pa.Table:
        files = self.files(days, shard)
        if not files:
            return SCHEMA.empty_table().select(list(columns))
        for path in files:
            self._check(path)
        dataset = ds.dataset([str(path) for path in files], schema=SCHEMA, format="parquet")
        try:
            return dataset.to_table(columns=list(columns), filter=where)
        except (pa.ArrowException, OSError) as exc:
            raise HistoryError(
                f"the update history at {self.folder} cannot be read: {_first_line(exc)}"
            ) from None

    def count_by_day(self, days: Sequence[str]) -> pd.Series:
        """Rows per day of `days` (index: day), zeros included: from the files' footers."""
        counts = {
            day: sum(self._check(path).num_rows for path in self._day_files(self.day_folder(day)))
            for day in days
        }
        return pd.Series(counts, dtype="int64").rename_axis("day")

    def _check(self, path: Path) -> pq.FileMetaData:
        """The file's footer, or a one-line error naming the file: it cannot be read, or its
        columns are not the history's."""
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowException, OSError) as exc:
            raise HistoryError(
                f"{path}: not a readable Parquet file of the update history ({_first_line(exc)})"
            ) from None
        found = metadata.schema.to_arrow_schema()
        wrong = [
            f"{field.name} ({field.type})"
            for field in SCHEMA
            if found.get_field_index(field.name) < 0 or not found.field(field.name).type.equals(field.type)
        ]
        if wrong:
            raise HistoryError(
                f"{path}: not a file of the update history: lacks or mistypes {', '.join(wrong)}"
            )
        return metadata

    # Erasure ----------------------------------------------------------------------------------

    def remove_devices(self, device_ids: Sequence[str]) -> int:
        """Rewrite every file holding rows of `device_ids` without them; rows removed."""
        if not device_ids:
            return 0
        erased = pa.array(list(device_ids), type=pa.string())
        removed = 0
        with self.exclusive():
            for path in self.files():
                self._check(path)
                devices = pq.read_table(path, columns=["device_id"]).column("device_id")
                hits = pc.is_in(devices, value_set=erased)
                count = pc.sum(hits).as_py() or 0
                if not count:
                    continue
                table = pq.read_table(path, schema=SCHEMA)
                self._write_file(path, table.filter(pc.invert(hits)))
                removed += count
        return removed

    def devices_of_customers(self, customer_ids: Sequence[str]) -> set[str]:
        """Every device whose rows carry one of `customer_ids`."""
        if not customer_ids:
            return set()
        where = ds.field("customer_id").isin(pa.array(list(customer_ids), type=pa.string()))
        table = self.read_table(None, ["device_id"], where)
        return set(pc.unique(table.column("device_id")).to_pylist())


def as_history_table(frame: pd.DataFrame) -> pa.Table:
    """`frame`'s history columns in the history's types (event times to the microsecond, as the
    persona store kept them)."""
    columns = {}
    for field in SCHEMA:
        values = frame[field.name] if field.name in frame.columns else pd.Series(None, index=frame.index)
        if field.name == "observed_at":
            values = pd.to_datetime(values, utc=True).dt.floor("us").astype("datetime64[us, UTC]")
        columns[field.name] = pa.Array.from_pandas(values, type=field.type)
    return pa.table(columns, schema=SCHEMA)


def _shard_number(path: Path) -> int:
    """The shard of a history file, from its folder's name (`shard=N`)."""
    return int(SHARD_FOLDER.match(path.parent.name).group(1))


def _in_key_order(table: pa.Table) -> pa.Table:
    return table.sort_by([("key", "ascending"), ("device_id", "ascending"), ("observed_at", "ascending")])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
