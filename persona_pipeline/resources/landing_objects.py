"""The landing zone on an object store (`s3://bucket/prefix`): the layout of the local landing
folder (docs/contracts.md), read through pyarrow's filesystem. An object store has no links,
pipes or empty folders, so what is refused there is what is misplaced: a day or batch "folder"
that is an object, an object in a subfolder, a misnamed folder."""

from __future__ import annotations

import hashlib
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from persona_pipeline.file_store import Location
from persona_pipeline.partitions import is_day
from persona_pipeline.resources.landing_files import (
    BATCH_PREFIX,
    COMPLETE_MARKER,
    DATE_FOLDER,
    FEEDBACK_FIELDS,
    FEEDBACK_FOLDER,
    UPDATES_FOLDER,
    ReadResult,
    batch_of_folder,
    not_read,
    read_landing_file,
)


@dataclass(frozen=True)
class ObjectFile:
    """One object of the landing zone, read as landing_files reads a local file."""

    location: Location
    path: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def read_bytes(self) -> bytes:
        return self.location.read_bytes(self.path)

    def open(self, mode: str = "rb") -> BinaryIO:
        return self.location.open_input(self.path)


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class ObjectLanding:
    location: Location

    @property
    def updates_root(self) -> str:
        return self.location.path(UPDATES_FOLDER)

    @property
    def feedback_root(self) -> str:
        return self.location.path(FEEDBACK_FOLDER)

    def label(self, path: str) -> str:
        """How a landing object is named in rejects and notes: relative to the landing root."""
        return posixpath.relpath(path, self.location.root)

    def _below(self, folder: str) -> list[pafs.FileInfo]:
        """What is directly in `folder`, in name order."""
        return sorted(self.location.entries(folder), key=lambda entry: entry.base_name)

    # Index updates -------------------------------------------------------------------------

    def date_folders(self) -> list[tuple[str, pafs.FileInfo]]:
        return [
            (match.group(1), entry)
            for entry in self._below(self.updates_root)
            if (match := DATE_FOLDER.match(entry.base_name))
        ]

    def landed_days(self) -> list[str]:
        return sorted(
            day for day, entry in self.date_folders() if is_day(day) and entry.type == pafs.FileType.Directory
        )

    def misnamed_folders(self) -> list[str]:
        return [
            entry.base_name
            for entry in self._below(self.updates_root)
            if entry.type == pafs.FileType.Directory
            and not (DATE_FOLDER.match(entry.base_name) and is_day(entry.base_name[5:]))
        ]

    def updates_folder_problems(self) -> list[str]:
        problems = [
            f"landing folder {UPDATES_FOLDER}/{name} is not date=YYYY-MM-DD: never read"
            for name in self.misnamed_folders()
        ]
        return problems + [
            f"{UPDATES_FOLDER}/{entry.base_name} is not a folder: never read"
            for entry in self._below(self.updates_root)
            if entry.type == pafs.FileType.File and not _hidden(entry.base_name)
        ]

    def settled_day_fingerprints(self, settle_seconds: float) -> dict[str, str]:
        newest_allowed_ns = int((time.time() - settle_seconds) * 1e9)
        fingerprints = {}
        for day in self.landed_days():
            folder = posixpath.join(self.updates_root, f"date={day}")
            try:
                files = [
                    entry
                    for entry in self._below(folder)
                    if entry.type == pafs.FileType.File and not _hidden(entry.base_name)
                ]
            except (pa.ArrowException, OSError) as exc:
                fingerprints[day] = hashlib.sha1(f"unlistable {_reason(exc)}".encode()).hexdigest()[:16]
                continue
            if not files or max(entry.mtime_ns or 0 for entry in files) > newest_allowed_ns:
                continue
            listing = "\n".join(f"{entry.base_name}\t{entry.size}\t{entry.mtime_ns}" for entry in files)
            fingerprints[day] = hashlib.sha1(listing.encode()).hexdigest()[:16]
        return fingerprints

    def read_day_files(self, day: str) -> Iterator[ReadResult]:
        folder = posixpath.join(self.updates_root, f"date={day}")
        label = self.label(folder)
        try:
            kind = self.location.info(folder).type
        except (pa.ArrowException, OSError) as exc:
            yield not_read(label, f"folder cannot be listed: {_reason(exc)}")
            return
        if kind == pafs.FileType.NotFound:
            yield ReadResult.empty([f"no landing folder {label}"])
            return
        if kind != pafs.FileType.Directory:
            yield not_read(label, "not a folder: not read")
            return
        files, skipped = self.folder_files(folder)
        yield skipped
        if not files and skipped.rejects.empty:
            yield ReadResult.empty([f"{label}: no files"])
        for found in files:
            yield read_landing_file(found, self.label(found.path))

    def folder_files(self, folder: str) -> tuple[list[ObjectFile], ReadResult]:
        """The objects directly in `folder`, in name order, and a reject for each object in a
        subfolder (never read). Markers and hidden names (`_*`, `.*`) are skipped, at any depth."""
        try:
            entries = self.location.entries(folder, recursive=True)
        except (pa.ArrowException, OSError) as exc:
            return [], not_read(self.label(folder), f"folder cannot be listed: {_reason(exc)}")
        parent = posixpath.basename(folder)
        files, rejects = [], []
        for entry in sorted(entries, key=lambda entry: entry.path):
            below = posixpath.relpath(entry.path, folder).split("/")
            if entry.type != pafs.FileType.File or any(_hidden(part) for part in below):
                continue
            if len(below) == 1:
                files.append(ObjectFile(self.location, entry.path))
            else:
                reason = f"in a subfolder of {parent}: not read (files go directly in {parent}/)"
                rejects.append(not_read(self.label(entry.path), reason))
        return files, ReadResult.concat(rejects) if rejects else ReadResult.empty()

    # Feedback batches ----------------------------------------------------------------------

    def feedback_folders(self) -> list[tuple[str | None, str]]:
        """(batch id or None, problem or "") per entry of offer_feedback/, as the local reader."""
        try:
            entries = self._below(self.feedback_root)
        except (pa.ArrowException, OSError) as exc:
            return [(None, f"{FEEDBACK_FOLDER}: cannot be listed: {_reason(exc)}")]
        found = []
        for entry in entries:
            if _hidden(entry.base_name):
                continue
            batch_id, problem = batch_of_folder(entry.base_name)
            if batch_id is None:
                found.append((None, problem))
                continue
            label = f"{FEEDBACK_FOLDER}/{entry.base_name}"
            if entry.type != pafs.FileType.Directory:
                found.append((None, f"{label}: not a folder: never read"))
            elif self.location.info(posixpath.join(entry.path, COMPLETE_MARKER)).type == pafs.FileType.File:
                found.append((batch_id, ""))
        return found

    def read_feedback_batch(self, batch_id: str) -> ReadResult:
        folder = posixpath.join(self.feedback_root, f"{BATCH_PREFIX}{batch_id}")
        marker = posixpath.join(folder, COMPLETE_MARKER)
        if self.location.info(marker).type != pafs.FileType.File:
            shown = self.location.shown_path(self.label(marker))
            raise FileNotFoundError(f"feedback batch {batch_id} is not complete: no {shown}")
        files, skipped = self.folder_files(folder)
        return ReadResult.concat(
            [
                skipped,
                *(
                    read_landing_file(found, self.label(found.path), FEEDBACK_FIELDS, FEEDBACK_FIELDS)
                    for found in files
                ),
            ]
        )
