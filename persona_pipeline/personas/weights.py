"""Key weights versions: the configured weights seed version 1; feedback adds candidate versions,
which go live only when the weights gate accepts them (status `accepted`; a refused candidate is
kept with status `rejected`). The live version is the newest accepted one. The key_weights asset
is the one writer of these rows (record_configured_weights, and the refresh's candidates)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import key_weights

ACCEPTED, REJECTED = "accepted", "rejected"


@dataclass(frozen=True)
class WeightsVersion:
    version: int
    weights: dict[str, float]
    source: str


def read_weights_versions(store: PersonaStore) -> pd.DataFrame:
    """Every version's rows: version, key, weight, created_at, source, status."""
    return store.read_frame(sa.select(key_weights).order_by(key_weights.c.version))


def _newest(rows: pd.DataFrame) -> WeightsVersion | None:
    """The newest version among `rows` (some of read_weights_versions'), if any."""
    if rows.empty:
        return None
    version = int(rows["version"].max())
    newest = rows[rows["version"] == version]
    return WeightsVersion(version, newest.set_index("key")["weight"].to_dict(), newest["source"].iloc[0])


class WeightsNotRecorded(ValueError):
    """No key weights version is recorded yet: the key_weights asset records the configured ones,
    and nothing else writes that table."""


def current_weights(store: PersonaStore) -> WeightsVersion:
    """The live weights version: the newest accepted one. Reading writes nothing; with no version
    recorded at all (a new store) it raises WeightsNotRecorded: vectors made with the configured
    weights would carry a version number no row holds. Configured weights edited since their last
    record stay out until key_weights records them (configured_weights_recorded says whether)."""
    versions = read_weights_versions(store)
    live = _newest(versions[versions["status"] == ACCEPTED])
    if live is None:
        raise WeightsNotRecorded(
            "no key weights are recorded yet: materialize key_weights first "
            "(personas_job runs it before persona_vectors, weights_job with device shards; "
            "configured_weights_sensor asks for it)"
        )
    return live


def configured_weights_recorded(store: PersonaStore, configured: dict[str, float]) -> bool:
    """Whether `configured` are the newest configured version recorded (False on a new store, and
    after someone edited them)."""
    return _recorded(read_weights_versions(store), configured)


def _recorded(versions: pd.DataFrame, configured: dict[str, float]) -> bool:
    last_config = _newest(versions[versions["source"] == "config"])
    return last_config is not None and last_config.weights == configured


def record_configured_weights(store: PersonaStore, configured: dict[str, float]) -> int | None:
    """Record the configured weights as a version of their own (`source` = `config`) the first time,
    and again whenever someone edits them in the configuration; learned versions in between are
    kept and win until then. Returns the new version, or None when they were recorded already."""
    versions = read_weights_versions(store)
    if _recorded(versions, configured):
        return None
    version = next_version(versions)
    insert_weights(store, version, configured, "config")
    return version


def next_version(versions: pd.DataFrame) -> int:
    """The number a new version gets: one more than any written, accepted or rejected."""
    return int(versions["version"].max()) + 1 if not versions.empty else 1


def initial_weights_version(store: PersonaStore) -> WeightsVersion | None:
    """The newest configured version (the weights learning started from), if any."""
    versions = read_weights_versions(store)
    return _newest(versions[versions["source"] == "config"])


def insert_weights(
    store: PersonaStore,
    version: int,
    weights: dict[str, float],
    source: str,
    connection: sa.Connection | None = None,
    status: str = ACCEPTED,
) -> None:
    """Write weights `version`; in `connection`'s transaction when given (so what records the
    version goes in with it), else in a transaction of its own."""
    frame = pd.DataFrame(
        {
            "version": version,
            "key": list(weights),
            "weight": list(weights.values()),
            "created_at": pd.Timestamp.now(tz="UTC"),
            "source": source,
            "status": status,
        }
    )
    if connection is not None:
        store.insert_frame(connection, key_weights, frame)
        return
    with store.begin() as own:
        store.insert_frame(own, key_weights, frame)
