"""The embedded vector index on Qdrant Edge: Qdrant's engine in process, one shard per collection.

Layout of the index folder:

    .lock                  held (flock) while a process has the index open
    aliases.json           {"personas": "personas_<space>"}, replaced atomically on every change
    collections/<name>/    one Edge shard per collection (its own write-ahead log and segments)

Edge has no collections or aliases of its own; these files give the same semantics: a collection
appears whole (created under a temporary name, then renamed) and an alias changes in one rename.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as edge

from persona_pipeline.resources.vector_stores.base import (
    Hit,
    StoredPoint,
    VectorIndexError,
    VectorStore,
    check_name,
    recommendation_vector,
)

ALIASES_FILE = "aliases.json"
COLLECTIONS_DIR = "collections"
LOCK_FILE = ".lock"
EDGE_CONFIG_FILE = "edge_config.json"  # written by Edge into every shard folder
SCRATCH_PREFIX = "."  # collections being created or dropped
# Edge writes through memory-mapped files: on a full disk a write is a SIGBUS that kills the
# process without a word, not an error. So a write first checks the free space: what the batch
# takes (vector, payload, write-ahead log) and room for the next 32 MiB file Edge may grow.
RESERVED_FREE_BYTES = 64 * 1024 * 1024
BYTES_PER_POINT_OVERHEAD = 1024


class QdrantEdgeStore(VectorStore):
    """Collections as Qdrant Edge shards under one folder; one process at a time."""

    def __init__(self, path: str | Path, location: str) -> None:
        self.location = location
        self.root = Path(path)
        self._shards: dict[str, edge.EdgeShard] = {}
        self.root.joinpath(COLLECTIONS_DIR).mkdir(parents=True, exist_ok=True)
        # Held until close(): the lock says which process has the index open.
        self._lock = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise VectorIndexError(
                f"cannot open the vector index at {location}: another process has it open "
                "(the embedded index admits one process at a time)"
            ) from None
        self._remove_scratch()
        self._aliases = self._read_aliases()

    def close(self) -> None:
        shards, self._shards = self._shards, {}
        try:
            for name, shard in shards.items():
                with self._engine(f"closing {name}"):
                    shard.flush()
                    shard.close()
        finally:
            if not self._lock.closed:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()

    @contextmanager
    def _engine(self, what: str, collection: str | None = None) -> Iterator[None]:
        # qdrant_edge raises plain Exception for everything (I/O, bad input, incompatible config).
        try:
            yield
        except Exception as exc:
            if _disk_full(exc):
                folder = self.root / COLLECTIONS_DIR / collection if collection else self.root
                raise VectorIndexError(
                    f"vector index at {self.location} failed {what}: the disk holding {folder} is full "
                    f"({exc})",
                    str(exc),
                ) from None
            raise VectorIndexError(
                f"vector index at {self.location} failed {what}: {exc}", str(exc)
            ) from None

    # Collections
    def _folder(self, name: str) -> Path:
        return self.root / COLLECTIONS_DIR / check_name(name)

    def collections(self) -> list[str]:
        folder = self.root / COLLECTIONS_DIR
        return sorted(
            p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(SCRATCH_PREFIX)
        )

    def dimensions(self, collection: str) -> int | None:
        folder = self._folder(self._aliases.get(collection, collection))
        if not folder.is_dir():
            return None
        config = folder / EDGE_CONFIG_FILE
        try:
            return int(json.loads(config.read_text())["vectors"][""]["size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VectorIndexError(
                f"vector index at {self.location}: collection {collection} is damaged, its {config} "
                f"cannot be read ({exc})",
                f"its {EDGE_CONFIG_FILE} cannot be read ({exc})",
            ) from None

    def create_collection(self, name: str, dimensions: int) -> None:
        target = self._folder(name)
        if target.exists():
            raise VectorIndexError(f"vector index at {self.location}: collection {name} already exists")
        scratch = target.with_name(f"{SCRATCH_PREFIX}new-{uuid.uuid4().hex}")
        config = edge.EdgeConfig(
            vectors=edge.EdgeVectorParams(size=dimensions, distance=edge.Distance.Euclid)
        )
        with self._engine(f"creating {name}", name):
            edge.EdgeShard.create(str(scratch), config).close()
            scratch.rename(target)
            _sync_folder(target.parent)

    def drop_collection(self, name: str) -> None:
        target = self._folder(name)
        if not target.is_dir():
            raise VectorIndexError(f"vector index at {self.location}: no collection {name}")
        # The aliases go first: a crash after this leaves an unnamed collection, never a dangling alias.
        self._write_aliases({a: c for a, c in self._aliases.items() if c != name})
        shard = self._shards.pop(name, None)
        if shard is not None:
            with self._engine(f"closing {name}"):
                shard.close()
        doomed = target.with_name(f"{SCRATCH_PREFIX}drop-{uuid.uuid4().hex}")
        target.rename(doomed)
        _sync_folder(target.parent)
        shutil.rmtree(doomed)

    def _shard(self, collection: str) -> edge.EdgeShard:
        name = self._aliases.get(collection, collection)
        shard = self._shards.get(name)
        if shard is None:
            folder = self._folder(name)
            if not folder.is_dir():
                raise VectorIndexError(f"vector index at {self.location}: no collection {collection}")
            with self._engine(f"opening {name}"):
                shard = edge.EdgeShard.load(str(folder))
            self._shards[name] = shard
        return shard

    # Points
    def upsert_batch(
        self, collection: str, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[dict]
    ) -> None:
        shard = self._shard(collection)
        vectors = np.asarray(vectors)
        per_point = 2 * (vectors.shape[1] * 4 if vectors.ndim == 2 else 0) + BYTES_PER_POINT_OVERHEAD
        self._check_free_space(collection, len(ids) * per_point)
        rows = vectors.tolist()
        points = [edge.Point(i, v, p) for i, v, p in zip(ids, rows, payloads, strict=True)]
        with self._engine(f"writing to {collection}", self._aliases.get(collection, collection)):
            shard.update(edge.UpdateOperation.upsert_points(points))

    def _check_free_space(self, collection: str, needed: int) -> None:
        folder = self._folder(self._aliases.get(collection, collection))
        free = shutil.disk_usage(folder).free
        if free < needed + RESERVED_FREE_BYTES:
            raise VectorIndexError(
                f"vector index at {self.location}: the disk holding {folder} is full ({free // 2**20} MiB "
                f"free, writing to {collection} needs {(needed + RESERVED_FREE_BYTES) // 2**20} MiB)",
                f"the disk holding {folder} is full ({free // 2**20} MiB free)",
            )

    def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        shard = self._shard(collection)
        self._check_free_space(collection, len(ids) * BYTES_PER_POINT_OVERHEAD)
        with self._engine(f"setting payload in {collection}", self._aliases.get(collection, collection)):
            shard.update(edge.UpdateOperation.set_payload(list(ids), dict(payload)))

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        if ids:
            shard = self._shard(collection)
            with self._engine(f"deleting from {collection}", self._aliases.get(collection, collection)):
                shard.update(edge.UpdateOperation.delete_points(list(ids)))
        return len(ids)

    def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = False) -> list[StoredPoint]:
        shard = self._shard(collection)
        with self._engine(f"reading {collection}"):
            records = shard.retrieve(list(ids), with_payload=True, with_vector=with_vectors)
        return [_point(r, with_vectors) for r in records]

    def scroll(self, collection: str, with_vectors: bool = False, page: int = 1000) -> Iterator[StoredPoint]:
        shard = self._shard(collection)
        offset = None
        while True:
            request = edge.ScrollRequest(
                offset=offset, limit=page, with_payload=True, with_vector=with_vectors
            )
            with self._engine(f"reading {collection}"):
                records, offset = shard.scroll(request)
            yield from (_point(r, with_vectors) for r in records)
            if offset is None:
                return

    def count(self, collection: str) -> int:
        shard = self._shard(collection)
        with self._engine(f"counting {collection}"):
            return shard.count(edge.CountRequest(exact=True))

    # Aliases
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def swap_alias(self, alias: str, collection: str) -> str | None:
        check_name(alias)
        previous = self._aliases.get(alias)
        if previous == collection:
            return previous
        if collection in self._aliases or not self._folder(collection).is_dir():
            raise VectorIndexError(f"vector index at {self.location}: no collection {collection} for {alias}")
        self._write_aliases({**self._aliases, alias: collection})
        return previous

    def _read_aliases(self) -> dict[str, str]:
        path = self.root / ALIASES_FILE
        if not path.is_file():
            return {}
        try:
            aliases = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise VectorIndexError(f"vector index at {self.location}: unreadable {path}: {exc}") from None
        return {str(a): str(c) for a, c in aliases.items()}

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        """Replace the alias file in one rename, so a reader sees the old or the new mapping."""
        path = self.root / ALIASES_FILE
        scratch = path.with_name(f"{SCRATCH_PREFIX}{ALIASES_FILE}.{uuid.uuid4().hex}")
        try:
            with open(scratch, "w", encoding="utf-8") as file:
                json.dump(aliases, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            scratch.unlink(missing_ok=True)
            if not _disk_full(exc):
                raise
            raise VectorIndexError(
                f"vector index at {self.location} failed writing {path}: the disk holding it is full ({exc})",
                str(exc),
            ) from None
        os.replace(scratch, path)
        _sync_folder(self.root)
        self._aliases = dict(aliases)

    def _remove_scratch(self) -> None:
        """Leftovers of a process that died while creating or dropping a collection."""
        for folder in (self.root, self.root / COLLECTIONS_DIR):
            for leftover in folder.glob(f"{SCRATCH_PREFIX}*"):
                if leftover.name == LOCK_FILE:
                    continue
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()

    # Queries
    def recommend(
        self,
        collection: str,
        positive: Sequence[str],
        negative: Sequence[str] = (),
        limit: int = 10,
        exclude: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[Hit]:
        if not positive:
            raise ValueError("recommend needs at least one positive example")
        positive, negative = [str(i) for i in positive], [str(i) for i in negative]
        examples = {p.id: p.vector for p in self.retrieve(collection, positive + negative, with_vectors=True)}
        missing = [i for i in positive + negative if i not in examples]
        if missing:
            raise VectorIndexError(
                f"vector index at {self.location}: example point {missing[0]} is not in {collection}"
            )
        dimensions = len(examples[positive[0]])

        def matrix(ids: list[str]) -> np.ndarray:
            return np.array([examples[i] for i in ids], dtype=np.float32).reshape(len(ids), dimensions)

        query = recommendation_vector(matrix(positive), matrix(negative))
        conditions: list = [
            edge.FieldCondition(key=key, match=edge.MatchAny(any=list(values)))
            for key, values in (exclude or {}).items()
            if len(values)
        ]
        conditions.append(edge.HasIdCondition(point_ids=set(examples)))
        request = edge.QueryRequest(
            limit=limit,
            query=edge.Query.Nearest(query.tolist()),
            filter=edge.Filter(must_not=conditions),
            with_payload=True,
            with_vector=False,
        )
        shard = self._shard(collection)
        with self._engine(f"querying {collection}"):
            hits = shard.query(request)
        return [Hit(str(h.id), float(h.score), dict(h.payload or {})) for h in hits]


def _disk_full(error: BaseException) -> bool:
    """ENOSPC, as an OSError or in the text of qdrant_edge's plain Exception ("os error 28")."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    text = str(error)
    return "No space left on device" in text or "os error 28" in text


def _point(record: Any, with_vectors: bool) -> StoredPoint:
    vector = list(record.vector) if with_vectors and record.vector is not None else None
    return StoredPoint(str(record.id), dict(record.payload or {}), vector)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
