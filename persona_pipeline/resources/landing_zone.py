"""The landing zone: daily folders of index-update files, or a SQL table with the same columns."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import sqlalchemy as sa
from pydantic import Field

from persona_pipeline import settings
from persona_pipeline.file_store import Location, open_location
from persona_pipeline.partitions import is_day
from persona_pipeline.resources.landing_files import (
    BATCH_PREFIX,
    COMPLETE_MARKER,
    DATE_FOLDER,
    FEEDBACK_FIELDS,
    FEEDBACK_FOLDER,
    FIELDS,
    UPDATES_FOLDER,
    ReadResult,
    batch_of_folder,
    check_batch_id,
    not_read,
    read_landing_file,
)
from persona_pipeline.resources.landing_objects import ObjectLanding


def is_valid_batch_id(batch_id: str) -> bool:
    try:
        check_batch_id(batch_id)
    except ValueError:
        return False
    return True


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path`, its symlinks resolved, stays inside `root` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # unreadable, or a symlink loop
        return False


class LandingZone(dg.ConfigurableResource):
    """Where raw index updates arrive (docs/contracts.md: `index_updates/date=YYYY-MM-DD/*`): a
    local folder, or an object-store URL read through pyarrow's filesystems."""

    path: str | None = Field(
        default=None,
        description="Landing folder or object-store URL such as s3://bucket/landing "
        "(PERSONA_LANDING_DIR). Default: $PERSONA_HOME/landing.",
    )
    source_db_url: str | None = Field(
        default=None,
        description="Read index updates from this SQL database instead of files (PERSONA_SOURCE_DB_URL).",
    )
    source_table: str = Field(
        default="index_updates", description="Table holding the updates in the SQL source."
    )

    @property
    def location(self) -> Location:
        return open_location(self.path or settings.landing_location(), "PERSONA_LANDING_DIR")

    @property
    def shown(self) -> str:
        """How messages name the landing zone (an object-store URL with any credentials masked)."""
        return self.location.shown

    @property
    def _objects(self) -> ObjectLanding | None:
        """The object-store reader, or None for a local folder."""
        location = self.location
        return None if location.is_local else ObjectLanding(location)

    @property
    def root(self) -> Path:
        """The landing folder; a landing zone on an object store has none (what writes a local
        folder, the demo's simulated feedback, cannot use it)."""
        location = self.location
        if not location.is_local:
            raise ValueError(
                f"the landing zone is on an object store ({location.shown}): this writes a local folder"
            )
        return Path(location.root)

    @property
    def updates_root(self) -> Path:
        return self.root / UPDATES_FOLDER

    def day_folder(self, day: str) -> Path:
        return self.updates_root / f"date={day}"

    def landed_days(self) -> list[str]:
        """Days with a well-named folder, sorted."""
        if (objects := self._objects) is not None:
            return objects.landed_days()
        return sorted(day for day, folder in self._date_folders() if is_day(day) and folder.is_dir())

    def misnamed_folders(self) -> list[str]:
        """Folders under index_updates/ that are not `date=YYYY-MM-DD`: they are never read."""
        if (objects := self._objects) is not None:
            return objects.misnamed_folders()
        if not self.updates_root.is_dir():
            return []
        return sorted(
            f.name
            for f in self.updates_root.iterdir()
            if f.is_dir() and not (DATE_FOLDER.match(f.name) and is_day(f.name[5:]))
        )

    def updates_folder_problems(self) -> list[str]:
        """One line per entry under index_updates/ that is never read, naming it and why: misnamed
        folders, and files or other entries where day folders belong."""
        if (objects := self._objects) is not None:
            return objects.updates_folder_problems()
        problems = [
            f"landing folder {UPDATES_FOLDER}/{name} is not date=YYYY-MM-DD: never read"
            for name in self.misnamed_folders()
        ]
        if not self.updates_root.is_dir():
            return problems
        for entry in sorted(self.updates_root.iterdir()):
            if not entry.is_dir() and not entry.name.startswith(("_", ".")):
                problems.append(f"{UPDATES_FOLDER}/{entry.name} is not a folder: never read")
        return problems

    def settled_day_fingerprints(self, settle_seconds: float) -> dict[str, str]:
        """Per well-named day folder, a fingerprint of its files (names, sizes, modification
        times). A day whose newest file changed less than `settle_seconds` ago is left out: it
        may still be being written."""
        if (objects := self._objects) is not None:
            return objects.settled_day_fingerprints(settle_seconds)
        newest_allowed = time.time() - settle_seconds
        fingerprints = {}
        for day in self.landed_days():
            try:
                files = sorted(
                    (p.name, p.stat())
                    for p in self.day_folder(day).iterdir()
                    if p.is_file() and not p.name.startswith(("_", "."))
                )
            except OSError as exc:
                # A run reports the folder as a reject; a new error is a new fingerprint.
                fingerprints[day] = hashlib.sha1(f"unlistable {exc.strerror}".encode()).hexdigest()[:16]
                continue
            if not files or max(stat.st_mtime for _, stat in files) > newest_allowed:
                continue
            listing = "\n".join(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}" for name, stat in files)
            fingerprints[day] = hashlib.sha1(listing.encode()).hexdigest()[:16]
        return fingerprints

    def _date_folders(self) -> list[tuple[str, Path]]:
        if not self.updates_root.is_dir():
            return []
        return [(m.group(1), f) for f in self.updates_root.iterdir() if (m := DATE_FOLDER.match(f.name))]

    @property
    def feedback_root(self) -> Path:
        return self.root / FEEDBACK_FOLDER

    def complete_feedback_batches(self) -> list[str]:
        """Batch ids of `offer_feedback/batch=<id>/` folders that hold `_SUCCESS` (complete) and
        are safe to read: a valid id, inside the landing zone. The others are in
        `feedback_folder_problems()`."""
        return sorted(
            batch_id for batch_id, problem in self._feedback_folders() if batch_id is not None and not problem
        )

    def feedback_folder_problems(self) -> list[str]:
        """One line per folder under offer_feedback/ that is never read, naming it and why."""
        return [problem for _, problem in self._feedback_folders() if problem]

    def _feedback_folders(self) -> list[tuple[str | None, str]]:
        """(batch id or None, problem or "") per entry of offer_feedback/; an incomplete batch
        (no _SUCCESS yet) has neither a problem nor a batch id: it may still be being written."""
        if (objects := self._objects) is not None:
            return objects.feedback_folders()
        try:
            entries = sorted(self.feedback_root.iterdir()) if self.feedback_root.is_dir() else []
        except OSError as exc:
            return [(None, f"{FEEDBACK_FOLDER}: cannot be listed: {exc.strerror}")]
        found = []
        for entry in entries:
            if entry.name.startswith(("_", ".")):
                continue
            batch_id, problem = batch_of_folder(entry.name)
            if batch_id is None:
                found.append((None, problem))
                continue
            label = f"{FEEDBACK_FOLDER}/{entry.name}"
            if not is_inside(entry, self.feedback_root.resolve()):
                found.append((None, f"{label}: resolves outside the landing zone (a symlink?): never read"))
            elif not entry.is_dir():
                found.append((None, f"{label}: not a folder: never read"))
            elif (entry / COMPLETE_MARKER).is_file():
                found.append((batch_id, ""))
        return found

    def read_feedback_batch(self, batch_id: str) -> ReadResult:
        if (objects := self._objects) is not None:
            return objects.read_feedback_batch(check_batch_id(batch_id))
        folder = self.feedback_root / f"{BATCH_PREFIX}{check_batch_id(batch_id)}"
        if not is_inside(folder, self.feedback_root.resolve()):
            raise ValueError(
                f"{folder.relative_to(self.root)} resolves outside the landing zone (a symlink?): not read"
            )
        if not (folder / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(
                f"feedback batch {batch_id} is not complete: no {folder / COMPLETE_MARKER}"
            )
        files, skipped = self._folder_files(folder, self.feedback_root.resolve())
        return ReadResult.concat(
            [
                skipped,
                *(read_landing_file(f, self._label(f), FEEDBACK_FIELDS, FEEDBACK_FIELDS) for f in files),
            ]
        )

    def read_day(self, day: str) -> ReadResult:
        """All rows that landed for one partition day, as written (validation comes next)."""
        return ReadResult.concat(list(self.read_day_files(day)))

    def read_day_files(self, day: str) -> Iterator[ReadResult]:
        """The rows of one partition day, a file at a time (the SQL source in one go)."""
        if self.source_db_url:
            yield self._read_day_from_sql(day)
            return
        if (objects := self._objects) is not None:
            yield from objects.read_day_files(day)
            return
        folder = self.day_folder(day)
        label = self._label(folder)
        if not folder.exists() and not folder.is_symlink():
            yield ReadResult.empty([f"no landing folder {label}"])
            return
        if not is_inside(folder, self.updates_root.resolve()):
            yield not_read(label, "resolves outside the landing zone (a symlink?): not read")
            return
        if not folder.is_dir():
            yield not_read(label, "not a folder: not read")
            return
        files, skipped = self._folder_files(folder, self.updates_root.resolve())
        yield skipped
        if not files and skipped.rejects.empty:
            yield ReadResult.empty([f"{label}: no files"])
        for f in files:
            yield read_landing_file(f, self._label(f))

    def _label(self, path: Path) -> str:
        """How a landing path is named in rejects and notes: relative to the landing root."""
        return str(path.relative_to(self.root))

    def _folder_files(self, folder: Path, boundary: Path) -> tuple[list[Path], ReadResult]:
        """The regular files directly in `folder` that stay inside `boundary` (the resolved
        index_updates/ or offer_feedback/ folder: those two may be links, e.g. to a mount, nothing
        below them may lead out), sorted, and a file reject for every other entry (its content
        never read): a link out, a file in a subfolder, a pipe or device. Markers and hidden files
        (`_*`, `.*`) are skipped."""
        try:
            entries = sorted(p for p in folder.iterdir() if not p.name.startswith(("_", ".")))
        except OSError as exc:
            return [], not_read(self._label(folder), f"folder cannot be listed: {exc.strerror}")
        files, rejects = [], []
        for entry in entries:
            label = self._label(entry)
            if not is_inside(entry, boundary):
                rejects.append((label, "resolves outside the landing zone (a symlink?): not read"))
            elif entry.is_dir():
                rejects += self._subfolder_files(entry, folder.name)
            elif not entry.is_file():
                rejects.append((label, "not a regular file (a pipe, socket or device): not read"))
            else:
                files.append(entry)
        return files, _not_read_all(rejects)

    def _subfolder_files(self, subfolder: Path, parent: str) -> list[tuple[str, str]]:
        """A reject per file anywhere under `subfolder` (links not followed): only the files
        directly in a day or batch folder are read."""
        reason = f"in a subfolder of {parent}: not read (files go directly in {parent}/)"
        found: list[tuple[str, str]] = []

        def unlistable(error: OSError) -> None:
            found.append((self._label(Path(error.filename)), f"folder cannot be listed: {error.strerror}"))

        for below, folders, names in os.walk(subfolder, onerror=unlistable):
            folders[:] = sorted(f for f in folders if not f.startswith(("_", ".")))
            found += [
                (self._label(Path(below) / name), reason)
                for name in sorted(names)
                if not name.startswith(("_", "."))
            ]
        return found

    def _read_day_from_sql(self, day: str) -> ReadResult:
        engine = sa.create_engine(self.source_db_url)
        try:
            table = sa.Table(self.source_table, sa.MetaData(), autoload_with=engine)
            observed = table.c["observed_at"]
            start = pd.Timestamp(day, tz="UTC")
            if isinstance(observed.type, sa.DateTime):
                end = start + pd.Timedelta(days=1)
                condition = (observed >= start.to_pydatetime()) & (observed < end.to_pydatetime())
            else:
                # Text timestamps with offsets do not sort as instants: read a day either
                # side, then keep the rows whose instant falls in the day (UTC).
                low = (start - pd.Timedelta(days=1)).strftime("%Y-%m-%d")
                high = (start + pd.Timedelta(days=2)).strftime("%Y-%m-%d")
                condition = (observed >= low) & (observed < high)
            columns = [table.c[c] for c in FIELDS if c in table.c]
            with engine.connect() as connection:
                result = connection.execute(sa.select(*columns).where(condition))
                frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        finally:
            engine.dispose()
        if not isinstance(observed.type, sa.DateTime) and not frame.empty:
            instant = pd.to_datetime(frame["observed_at"], utc=True, format="ISO8601", errors="coerce")
            unparseable_of_day = instant.isna() & frame["observed_at"].astype(str).str.startswith(day)
            in_day = (instant.dt.strftime("%Y-%m-%d") == day) | unparseable_of_day
            frame = frame[in_day]
        elif not frame.empty:
            frame["observed_at"] = pd.to_datetime(frame["observed_at"], utc=True).dt.strftime(
                "%Y-%m-%dT%H:%M:%S.%f%z"
            )
        label = f"sql:{self.source_table}"
        frame = frame.reset_index(drop=True).astype(object)
        for column in FIELDS:
            if column not in frame.columns:
                frame[column] = None
        frame["source_file"] = label
        frame["source_row"] = None
        frame["raw"] = None
        return ReadResult(frame, ReadResult.empty().rejects)


def _not_read_all(rejects: list[tuple[str, str]]) -> ReadResult:
    if not rejects:
        return ReadResult.empty()
    return ReadResult.concat([not_read(label, reason) for label, reason in rejects])
