"""The history of accepted updates: each day's accepted index updates as Parquet files beside
the persona store (docs/contracts.md, "The update history"). This module owns the layout; the
index_updates asset is its one writer, and erasure rewrites files without an erased subject's rows.

    <root>/index_updates/date=YYYY-MM-DD/shard=N/part-0.parquet

`<root>` is a local folder or an object-store URL (`s3://bucket/prefix`). A device's rows are in
shard `stable_hash(device_id) % shards`. Every file is written whole, so a reader sees a day's file
before or after a write, never half of one (locally: a temporary name renamed over the old file;
on an object store: one object put); writing a day again replaces its files (and removes shards a
smaller shard count no longer uses).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from persona_pipeline.device_shards import DeviceShard, shard_of
from persona_pipeline.file_store import Location, open_location

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
_HELD: set[str] = set()  # the histories whose lock this process holds


class HistoryError(dg.Failure):
    """A file of the update history cannot be read, or is not one this pipeline wrote: one line
    naming it. Trying again cannot help, so a run's step is not retried."""

    def __init__(self, message: str) -> None:
        super().__init__(description=message, allow_retries=False)

    def __str__(self) -> str:
        return self.description or ""


@dataclass(frozen=True)
class UpdateHistory:
    """The history under `root` (a local folder or an object-store URL), written in `shards`
    shards per day. `lock`, when given, is what `exclusive()` holds: a history on an object store
    needs one every worker sees (PersonaStore.history gives the persona store's); a local one
    locks a file in its folder."""

    root: str | Path
    shards: int = 1
    lock: Callable[[], AbstractContextManager[None]] | None = dataclasses.field(default=None, compare=False)

    @cached_property
    def location(self) -> Location:
        return open_location(self.root, "PERSONA_HISTORY_DIR")

    @property
    def folder(self) -> str:
        """The history's folder, as the filesystem names it (a local path, or bucket/prefix)."""
        return self.location.path(UPDATES_FOLDER)

    @property
    def shown(self) -> str:
        """How messages name the history's folder."""
        return self.location.shown_path(UPDATES_FOLDER)

    def day_folder(self, day: str) -> str:
        return posixpath.join(self.folder, f"date={day}")

    # Writing ----------------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the history's lock (across processes, and machines when `lock` is shared): an
        erasure's rewrite of a file must not put back rows an ingest of the day just replaced.
        Taken again inside itself, in the same process, it is already held."""
        if self.folder in _HELD:
            yield
            return
        if self.lock is not None:
            held = self.lock()
        elif self.location.is_local:
            held = file_lock(Path(self.folder) / LOCK_NAME)
        else:
            raise HistoryError(
                f"the update history at {self.shown} is on an object store: open it through the persona "
                "store (PersonaStore.history), whose database holds its lock"
            )
        with held:
            _HELD.add(self.folder)
            try:
                yield
            finally:
                _HELD.discard(self.folder)

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
                f"device shard {shard.index} of {shard.count}: the update history at {self.shown} "
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
                path = posixpath.join(self.day_folder(day), f"shard={shard.index}", PART_NAME)
                if rows.num_rows:
                    self._write_file(path, rows, in_key_order=True)
                else:
                    self.location.delete_file(path)
                for other in self._day_files(self.day_folder(day)):
                    if _shard_number(other) >= shard.count:
                        self.location.delete_file(other)
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
            self._write_file(posixpath.join(folder, f"shard={shard}", PART_NAME), rows, in_key_order=True)
        written = set(by_shard)
        for path in self._day_files(folder):
            if _shard_number(path) not in written:
                self.location.delete_file(path)

    def _write_file(self, path: str, table: pa.Table, in_key_order: bool = False) -> None:
        """`table` becomes the file at `path` whole: a reader sees the old file or the new one.
        With `in_key_order`, its rows sorted by key, device and event time."""
        if not self.location.is_local:
            buffer = pa.BufferOutputStream()
            _write_parquet(buffer, table, in_key_order)
            self.location.write_bytes(path, buffer.getvalue().to_pybytes())
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            _write_parquet(str(temporary), table, in_key_order)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    # Reading ----------------------------------------------------------------------------------

    def days(self) -> list[str]:
        """The days the history holds files of, oldest first."""
        found = (
            DAY_FOLDER.match(entry.base_name)
            for entry in self._entries(self.folder)
            if entry.type == pafs.FileType.Directory
        )
        return sorted(match.group(1) for match in found if match)

    def files(self, days: Iterable[str] | None = None, shard: int | None = None) -> list[str]:
        """The Parquet files of `days` (every day when None), of one shard or all, as the
        history's filesystem names them."""
        chosen = self.days() if days is None else days
        return [path for day in chosen for path in self._day_files(self.day_folder(day), shard)]

    def _day_files(self, folder: str, shard: int | None = None) -> list[str]:
        files = sorted(
            entry.path
            for entry in self._entries(folder, recursive=True)
            if entry.type == pafs.FileType.File
            and entry.base_name == PART_NAME
            and posixpath.dirname(posixpath.dirname(entry.path)) == folder
            and SHARD_FOLDER.match(posixpath.basename(posixpath.dirname(entry.path)))
        )
        return files if shard is None else [path for path in files if _shard_number(path) == shard]

    def _entries(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        try:
            return self.location.entries(folder, recursive)
        except (pa.ArrowException, OSError) as exc:
            raise HistoryError(
                f"the update history at {self.shown} cannot be listed: {_first_line(exc)}"
            ) from None

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
        dataset = ds.dataset(files, schema=SCHEMA, format="parquet", filesystem=self.location.filesystem)
        try:
            return dataset.to_table(columns=list(columns), filter=where)
        except (pa.ArrowException, OSError) as exc:
            raise HistoryError(
                f"the update history at {self.shown} cannot be read: {_first_line(exc)}"
            ) from None

    def count_by_day(self, days: Sequence[str]) -> pd.Series:
        """Rows per day of `days` (index: day), zeros included: from the files' footers."""
        counts = {
            day: sum(self._check(path).num_rows for path in self._day_files(self.day_folder(day)))
            for day in days
        }
        return pd.Series(counts, dtype="int64").rename_axis("day")

    def _check(self, path: str) -> pq.FileMetaData:
        """The file's footer, or a one-line error naming the file: it cannot be read, or its
        columns are not the history's."""
        shown = self._shown(path)
        try:
            metadata = pq.read_metadata(path, filesystem=self.location.filesystem)
        except (pa.ArrowException, OSError) as exc:
            raise HistoryError(
                f"{shown}: not a readable Parquet file of the update history ({_first_line(exc)})"
            ) from None
        found = metadata.schema.to_arrow_schema()
        wrong = [
            f"{field.name} ({field.type})"
            for field in SCHEMA
            if found.get_field_index(field.name) < 0 or not found.field(field.name).type.equals(field.type)
        ]
        if wrong:
            raise HistoryError(
                f"{shown}: not a file of the update history: lacks or mistypes {', '.join(wrong)}"
            )
        return metadata

    def _shown(self, path: str) -> str:
        return self.location.shown_path(posixpath.relpath(path, self.location.root))

    # Erasure ----------------------------------------------------------------------------------

    def remove_devices(
        self,
        device_ids: Sequence[str],
        each_file: Callable[[int], AbstractContextManager] | None = None,
    ) -> int:
        """Rewrite every file holding rows of `device_ids` without them; rows removed.
        `each_file(rows)`: entered around each file's rewrite, with the rows it removes (a caller
        that records them does so in step with the files)."""
        if not device_ids:
            return 0
        erased = pa.array(list(device_ids), type=pa.string())
        removed = 0
        filesystem = self.location.filesystem
        with self.exclusive():
            for path in self.files():
                self._check(path)
                devices = pq.read_table(path, columns=["device_id"], filesystem=filesystem).column(
                    "device_id"
                )
                hits = pc.is_in(devices, value_set=erased)
                count = pc.sum(hits).as_py() or 0
                if not count:
                    continue
                table = pq.read_table(path, schema=SCHEMA, filesystem=filesystem)
                with each_file(count) if each_file else nullcontext():
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


def _shard_number(path: str) -> int:
    """The shard of a history file, from its folder's name (`shard=N`)."""
    return int(SHARD_FOLDER.match(posixpath.basename(posixpath.dirname(path))).group(1))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (made if missing), across the processes of a machine or a
    shared volume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


KEY_ORDER = [("key", "ascending"), ("device_id", "ascending"), ("observed_at", "ascending")]


# Rows sorted and written at a time: eight row groups, about a tenth of a 10M-row day.
WRITE_BATCH_ROWS = 8 * ROW_GROUP_ROWS


def _write_parquet(sink: str | pa.NativeFile, table: pa.Table, in_key_order: bool) -> None:
    """`table` as Parquet in row groups of ROW_GROUP_ROWS; sorted by KEY_ORDER when asked, a
    batch of rows taken in that order at a time, so a 10M-row day is never held twice."""
    order = pc.sort_indices(table, KEY_ORDER) if in_key_order else None
    with pq.ParquetWriter(sink, table.schema, compression="zstd") as writer:
        for start in range(0, table.num_rows, WRITE_BATCH_ROWS):
            rows = (
                table.slice(start, WRITE_BATCH_ROWS)
                if order is None
                else table.take(order.slice(start, WRITE_BATCH_ROWS))
            )
            writer.write_table(rows, row_group_size=ROW_GROUP_ROWS)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
