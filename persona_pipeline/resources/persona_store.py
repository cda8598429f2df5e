"""The persona store: a SQLAlchemy database (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache, partial
from itertools import repeat
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.dialects import postgresql, sqlite

from persona_pipeline import settings
from persona_pipeline.file_store import open_location
from persona_pipeline.resources.update_history import UpdateHistory, file_lock
from persona_pipeline.secrets import mask_url
from persona_pipeline.store.schema import upgrade_to_head
from persona_pipeline.store.tables import index_updates as stored_updates

WRITE_CHUNK_ROWS = 50_000
# Values per IN (...) list: SQLite allows 32,766 bound parameters a statement.
IN_CHUNK = 10_000
READ_CHUNK_ROWS = 100_000
SQLITE_CACHE_KIB = 64 * 1024

# What a database says when its disk is full, it is read-only or its file cannot be opened:
# (SQLite message or PostgreSQL SQLSTATE, what a person is told).
_SQLITE_UNAVAILABLE = {
    "database or disk is full": "the disk is full",
    "disk i/o error": "a disk I/O error (the disk may be full or failing)",
    "attempt to write a readonly database": "it is read-only",
    "unable to open database file": "its file cannot be opened (missing folder, permissions or a full disk)",
}
_POSTGRES_UNAVAILABLE = {
    "53100": "the database's disk is full",  # disk_full
    "25006": "it is read-only (a read-only transaction or a standby server)",  # read_only_sql_transaction
    "53200": "the server is out of memory",  # out_of_memory
}


class StoreUnavailable(RuntimeError):
    """The persona store cannot be written or read because of where it lives (a full disk, a
    read-only file or server): one line naming the store, its path and what is wrong."""


def _unavailable(url: str, error: BaseException) -> StoreUnavailable | None:
    """The store's error as StoreUnavailable when it is about the disk or the file, else None."""
    original = getattr(error, "orig", error)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        message = str(original).lower()
        reason = next((why for text, why in _SQLITE_UNAVAILABLE.items() if text in message), None)
        where = f"the persona store at {parsed.database or url}"
    else:
        reason = _POSTGRES_UNAVAILABLE.get(getattr(original, "sqlstate", None) or "")
        where = f"the persona store at {mask_url(url)}"
    if reason is None:
        return None
    detail = (
        mask_url(str(original).strip().splitlines()[0]) if str(original).strip() else type(original).__name__
    )
    return StoreUnavailable(f"{where} cannot be used: {reason} ({detail})")


NewerPredicate = Callable[[sa.ColumnCollection, sa.ColumnCollection], sa.ColumnElement[bool]]


@lru_cache(maxsize=16)
def _engine(url: str) -> sa.Engine:
    engine = connect(url)
    try:
        upgrade_to_head(engine)
    except sa.exc.DBAPIError as exc:
        unavailable = _unavailable(url, exc)
        if unavailable is None:
            raise
        raise unavailable from None
    return engine


@lru_cache(maxsize=16)
def _history(url: str, root: str, shards: int) -> UpdateHistory:
    history = history_beside(url, root, shards)
    move_stored_updates(_engine(url), history)
    return history


def history_beside(url: str, root: str, shards: int) -> UpdateHistory:
    """The update history at `root` kept beside the persona store at `url`: on an object store,
    its lock is held in that store."""
    lock = None if open_location(root, "PERSONA_HISTORY_DIR").is_local else partial(history_lock, url)
    return UpdateHistory(root, shards, lock)


# Any number, the same in every process: the key of the update history's advisory lock.
HISTORY_LOCK_KEY = 7_414_220_611


@contextmanager
def history_lock(url: str) -> Iterator[None]:
    """The lock of an update history kept on an object store, held in the persona store every
    worker shares: PostgreSQL's advisory lock; beside a SQLite store (one machine), a lock file
    next to the database."""
    engine = _engine(url)
    if engine.dialect.name != "postgresql":
        database = engine.url.database
        if not database or database == ":memory:":
            raise ValueError(
                f"the persona store at {mask_url(url)} keeps no file: an update history on an object store "
                "needs PostgreSQL (or a SQLite file) to hold its lock"
            )
        with file_lock(Path(f"{database}.history-lock")):
            yield
        return
    with engine.connect() as connection:
        connection.execute(sa.text("select pg_advisory_lock(:key)"), {"key": HISTORY_LOCK_KEY})
        try:
            yield
        finally:
            connection.execute(sa.text("select pg_advisory_unlock(:key)"), {"key": HISTORY_LOCK_KEY})


def move_stored_updates(engine: sa.Engine, history: UpdateHistory) -> list[str]:
    """Move the rows of the `index_updates` table (written before revision 0010) to `history`,
    one day at a time: the day's files are written, then its rows deleted, so a move stopped
    half-way goes on where it stopped. The days moved."""
    day = stored_updates.c.partition_date
    with engine.connect() as connection:
        days = [row[0] for row in connection.execute(sa.select(day).distinct().order_by(day))]
    moved = []
    for partition_date in days:
        with history.exclusive(), engine.begin() as connection:
            rows = connection.execute(sa.select(stored_updates).where(day == partition_date))
            frame = _sqlite_frame(rows) if connection.dialect.name == "sqlite" else _plain_frame(rows)
            if frame.empty:  # another process moved the day since the list was read
                continue
            frame["observed_at"] = as_utc(frame["observed_at"])
            history.write_days([partition_date], frame)
            connection.execute(stored_updates.delete().where(day == partition_date))
        moved.append(partition_date)
    return moved


def _plain_frame(result: sa.CursorResult) -> pd.DataFrame:
    # Plain tuples: pandas probes each SQLAlchemy Row for attributes, which costs more than
    # reading the rows.
    return pd.DataFrame([tuple(row) for row in result.fetchall()], columns=list(result.keys()))


def connect(url: str) -> sa.Engine:
    """An engine for the persona store at `url`, schema untouched (see store.schema). Its errors
    never show a statement's values (device and customer ids, raw lines): a failed step's error
    is kept in Dagster's run storage, which an erasure does not reach."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            # Up to 64 MiB of pages per connection (default 2 MiB): writing a day's updates
            # touches an index too large for the default, and thrashed it.
            cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cursor.close()
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, hide_parameters=True)

    @sa.event.listens_for(engine, "handle_error")
    def _name_the_store(context: sa.engine.ExceptionContext) -> BaseException | None:
        # Every statement's and connection's error passes here: a full disk or a read-only
        # store becomes one line naming it, whichever helper was writing or reading.
        return _unavailable(url, context.original_exception)

    return engine


def _driver_values(series: pd.Series, processor: Callable | None, dialect: sa.Dialect) -> list:
    """A column as the values the database driver takes: None for missing, Python scalars,
    through the column type's bind processor; column by column, not row by row."""
    if dialect.name == "sqlite" and pd.api.types.is_datetime64_any_dtype(series.dtype):
        # What SQLAlchemy's SQLite DATETIME writes ('2026-03-01 10:00:00.000000', the wall-clock
        # fields), formatted by Arrow for the whole column instead of once per row.
        wall = series.dt.tz_localize(None) if series.dt.tz is not None else series
        return pa.array(wall.dt.floor("us").astype("datetime64[us]")).cast(pa.string()).to_pylist()
    values = series.astype(object).where(series.notna(), None).tolist()
    return values if processor is None else list(map(processor, values))


def _execute_many(
    connection: sa.Connection, statement: sa.Executable, frame: pd.DataFrame, columns: list[str]
) -> None:
    """Execute `statement` once per row of `frame` through the driver's executemany, with the
    parameters prepared column by column (SQLAlchemy's own executemany prepares each row in
    Python, which costs more than the database's work)."""
    dialect = connection.dialect
    compiled = statement.compile(dialect=dialect, column_keys=columns)
    processors = dict(compiled._bind_processors)
    table = getattr(statement, "table", None)
    if dialect.name == "sqlite" and table is not None:
        # sqlite3 takes bytes as BLOBs as they are; the binary types' processor only wraps each
        # value in sqlite3.Binary (SQLAlchemy says as much), 3 us a value.
        for column in table.columns:
            if isinstance(column.type, sa.LargeBinary):
                processors.pop(column.key, None)
    values = {name: _driver_values(frame[name], processors.get(name), dialect) for name in columns}
    constants = {
        name: processors[name](value) if name in processors else value
        for name, value in compiled.params.items()
        if name not in values
    }
    if compiled.positional:
        rows = len(frame)
        sources = [values[n] if n in values else repeat(constants[n], rows) for n in compiled.positiontup]
        parameters = list(zip(*sources, strict=True))
    else:
        names = list(values)
        rows = zip(*values.values(), strict=True)
        parameters = [{**constants, **dict(zip(names, row, strict=True))} for row in rows]
    connection.exec_driver_sql(str(compiled), parameters)


def _sqlite_frame(result: sa.CursorResult) -> pd.DataFrame:
    """The rows as SQLAlchemy would return them, with its per-value conversions done per column
    (SQLite hands back timestamps as text, which SQLAlchemy parses one value at a time), fetched
    READ_CHUNK_ROWS at a time: a row as Python objects takes several times its size in a frame."""
    keys = list(result.keys())
    processors = getattr(result._metadata, "_processors", None)
    if processors is None or len(processors) != len(keys):
        return pd.DataFrame([tuple(row) for row in result.fetchall()], columns=keys)
    chunks = []
    while rows := result.cursor.fetchmany(READ_CHUNK_ROWS):
        chunks.append(_converted(pd.DataFrame(rows, columns=keys), rows, processors))
    result.close()
    if len(chunks) <= 1:
        return chunks[0] if chunks else pd.DataFrame([], columns=keys)
    return _concat_as_one(chunks)


def _converted(frame: pd.DataFrame, rows: list[tuple], processors: list) -> pd.DataFrame:
    for position, (key, processor) in enumerate(zip(frame.columns, processors, strict=True)):
        if processor is None or frame.empty or frame[key].isna().all():
            continue
        column = frame[key]
        if processor is _SQLITE_DATETIME:
            parsed = _parse_sqlite_datetimes(column)
            if parsed is not None:
                frame[key] = parsed
                continue
        if processor is _SQLITE_BOOLEAN and column.dtype == np.int64:  # 0 and 1, no NULL
            frame[key] = column.astype(bool)
            continue
        values = [processor(row[position]) for row in rows]
        frame[key] = pd.DataFrame([(value,) for value in values], columns=[key])[key]
    return frame


def _concat_as_one(chunks: list[pd.DataFrame]) -> pd.DataFrame:
    """Chunks put together with the dtypes pandas gives the rows read in one go: a chunk whose
    column is all NULL reads as objects, and NULLs make integers floats and booleans objects."""
    columns = {}
    for key in chunks[0].columns:
        parts = [chunk[key] for chunk in chunks]
        empty = [part.isna().all() for part in parts]
        if all(empty) or not any(empty):
            columns[key] = pd.concat(parts, ignore_index=True)
            continue
        kind = pd.concat([p for p, e in zip(parts, empty, strict=True) if not e], ignore_index=True).dtype
        if kind == np.int64:
            kind = np.dtype(np.float64)
        elif kind == np.dtype(bool):
            kind = np.dtype(object)
        columns[key] = pd.concat([p.astype(kind) for p in parts], ignore_index=True)
    return pd.DataFrame(columns)


_SQLITE_DATETIME = sa.DateTime()._cached_result_processor(sqlite.dialect(), None)
_SQLITE_BOOLEAN = sa.Boolean()._cached_result_processor(sqlite.dialect(), None)


def _parse_sqlite_datetimes(column: pd.Series) -> pd.Series | None:
    """SQLite's timestamp text ('2026-03-01 10:00:00.000000') as the naive datetime64[us] values
    SQLAlchemy's datetimes make; None when some text is not in that form."""
    if not isinstance(column.dtype, pd.StringDtype):  # not text throughout
        return None
    if not column.dropna().str.fullmatch(_SQLITE_DATETIME_TEXT).all():
        return None
    return pd.to_datetime(column, format="ISO8601").astype("datetime64[us]")


_SQLITE_DATETIME_TEXT = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}"


class PersonaStore(dg.ConfigurableResource):
    """The persona store's tables (docs/contracts.md), behind small read and write helpers."""

    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (PERSONA_DB_URL). Default: SQLite at $PERSONA_HOME/persona.db.",
    )

    history_dir: str | None = Field(
        default=None,
        description="Folder of the update history, the accepted updates as Parquet "
        "(PERSONA_HISTORY_DIR). Default: $PERSONA_HOME/history.",
    )
    history_shards: int | None = Field(
        default=None,
        ge=settings.SHARD_LIMITS[0],
        le=settings.SHARD_LIMITS[1],
        description="Files per day of the update history, by a stable hash of device_id "
        "(PERSONA_HISTORY_SHARDS). Default: 1, or PERSONA_DEVICE_SHARDS when there are several "
        "device shards (then any other count is refused).",
    )

    @property
    def resolved_url(self) -> str:
        return self.url or settings.persona_db_url()

    @property
    def history(self) -> UpdateHistory:
        """The update history beside this store. On first use in a process, rows a store from
        before revision 0010 still holds in its `index_updates` table move to it."""
        root = self.history_dir if self.history_dir else settings.history_location()
        if not settings.is_storage_url(root):
            root = str(Path(root).expanduser().resolve())
        shards = self.history_shards or settings.history_shards()
        device_shards = settings.device_shards()
        if device_shards > 1 and shards != device_shards:
            raise ValueError(
                f"PersonaStore.history_shards={shards} differs from PERSONA_DEVICE_SHARDS="
                f"{device_shards}: with device shards the history keeps one file per shard"
            )
        return _history(self.resolved_url, root, shards)

    @property
    def engine(self) -> sa.Engine:
        return _engine(self.resolved_url)

    @property
    def display_url(self) -> str:
        """The URL with its credentials masked (password, secret query parameters): the only form
        that may be logged."""
        return mask_url(self.resolved_url)

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as connection:
            yield connection

    def read_frame(self, query: sa.Executable, connection: sa.Connection | None = None) -> pd.DataFrame:
        if connection is None:
            with self.engine.connect() as own:
                return self.read_frame(query, own)
        result = connection.execute(query)
        if connection.dialect.name == "sqlite":
            return _sqlite_frame(result)
        return _plain_frame(result)

    def read_frame_in(self, query: sa.Select, column: sa.ColumnElement, values: Sequence) -> pd.DataFrame:
        """`query`'s rows whose `column` is one of `values`, read in chunks that fit every
        backend's limit on bound parameters."""
        chunks = [
            self.read_frame(query.where(column.in_(values[start : start + IN_CHUNK])))
            for start in range(0, len(values), IN_CHUNK)
        ]
        return pd.concat(chunks, ignore_index=True) if chunks else self.read_frame(query.where(sa.false()))

    def read_pages(self, query: sa.Select, key: sa.ColumnElement, rows: int) -> Iterator[pd.DataFrame]:
        """`query`'s rows `rows` at a time in `key` order (a unique column the query selects),
        each page read after the last key of the one before: no OFFSET, so every page costs the
        same, and rows written between pages before the last key are not read again."""
        ordered = query.order_by(key).limit(rows)
        last = None
        while True:
            page = self.read_frame(ordered if last is None else ordered.where(key > last))
            if page.empty:
                return
            yield page
            last = page[key.name].iloc[-1]

    @staticmethod
    def delete_in(
        connection: sa.Connection,
        table: sa.Table,
        column: sa.ColumnElement,
        values: Sequence,
        where: sa.ColumnElement[bool] | None = None,
    ) -> None:
        """Delete the rows whose `column` is one of `values` (and that match `where`), in chunks."""
        for start in range(0, len(values), IN_CHUNK):
            condition = column.in_(values[start : start + IN_CHUNK])
            connection.execute(table.delete().where(condition if where is None else where & condition))

    def scalar(self, query: sa.Executable):
        with self.engine.connect() as connection:
            return connection.execute(query).scalar()

    @staticmethod
    def hold_other_writers(connection: sa.Connection, table: sa.Table) -> None:
        """Make other writers of `table` wait until this transaction ends, before it reads what it
        will check its rows against; readers go on. PostgreSQL: a lock on the table that only
        writers conflict with. SQLite has one writer at a time: a statement that writes nothing
        still begins the write transaction now rather than at the first insert."""
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text(f"LOCK TABLE {table.name} IN SHARE ROW EXCLUSIVE MODE"))
        else:
            connection.execute(table.delete().where(sa.false()))

    @staticmethod
    def insert_frame(connection: sa.Connection, table: sa.Table, frame: pd.DataFrame) -> int:
        columns = [c.name for c in table.columns if c.name in frame.columns]
        for start in range(0, len(frame), WRITE_CHUNK_ROWS):
            _execute_many(connection, table.insert(), frame.iloc[start : start + WRITE_CHUNK_ROWS], columns)
        return len(frame)

    def replace_rows(self, table: sa.Table, where: sa.ColumnElement[bool], frame: pd.DataFrame) -> int:
        """Delete the rows matching `where` and insert `frame`, in one transaction."""
        with self.begin() as connection:
            connection.execute(table.delete().where(where))
            return self.insert_frame(connection, table, frame)

    def upsert_newer(
        self,
        table: sa.Table,
        frame: pd.DataFrame,
        key_columns: Sequence[str],
        newer_than_existing: NewerPredicate | None = None,
        connection: sa.Connection | None = None,
    ) -> None:
        """Insert rows; on a key conflict overwrite only where `newer_than_existing` holds.

        `newer_than_existing(stored, incoming)` gets the stored row's columns and the
        incoming row's (`excluded`) columns and returns the SQL condition.
        """
        if frame.empty:
            return
        if connection is None:
            with self.begin() as own:
                return self.upsert_newer(table, frame, key_columns, newer_than_existing, own)
        dialect = connection.dialect.name
        insert_fn = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
        if insert_fn is None:
            raise NotImplementedError(f"upserts are implemented for SQLite and PostgreSQL, not {dialect}")
        statement = insert_fn(table)
        value_columns = [c.name for c in table.columns if c.name not in key_columns]
        statement = statement.on_conflict_do_update(
            index_elements=list(key_columns),
            set_={name: statement.excluded[name] for name in value_columns},
            where=(newer_than_existing(table.c, statement.excluded) if newer_than_existing else None),
        )
        columns = [c.name for c in table.columns if c.name in frame.columns]
        for start in range(0, len(frame), WRITE_CHUNK_ROWS):
            _execute_many(connection, statement, frame.iloc[start : start + WRITE_CHUNK_ROWS], columns)


def as_utc(values: pd.Series) -> pd.Series:
    """Timestamps read back from any backend as UTC-aware (SQLite returns naive UTC)."""
    return pd.to_datetime(values, utc=True)


def int64_fingerprint(frame: pd.DataFrame) -> np.ndarray:
    """A stable 64-bit hash per row, as signed int64 so every database can store it."""
    return pd.util.hash_pandas_object(frame, index=False).to_numpy().view(np.int64)
