"""Reads and writes of the anomalies domain in the persona store."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

from persona_pipeline.anomalies.scoring import AnomalyNorms
from persona_pipeline.personas.storage import devices_without_a_vector
from persona_pipeline.resources.persona_store import PersonaStore, as_utc
from persona_pipeline.segments.key_stats import SegmentStats
from persona_pipeline.store.tables import anomaly_norms, anomaly_scores, device_clusters, persona_vectors


@dataclass
class NormsRow:
    """What the stored norms were fitted for, read without loading them."""

    space: str
    segments_fitted_at: pd.Timestamp
    settings: str
    fitted_at: pd.Timestamp
    devices: int
    versions: str


@dataclass
class StoredNorms:
    """The norms of the last scoring of the whole fleet and what they were fitted for."""

    space: str
    segments_fitted_at: pd.Timestamp
    settings: str
    fitted_at: pd.Timestamp
    devices: int
    norms: AnomalyNorms
    stats: SegmentStats  # the segments' typical values the reasons compare with


class NormsUnreadable(Exception):
    """The stored norms cannot be loaded: not signed with this deployment's key, or written by
    code this one cannot read."""


def library_versions() -> str:
    """The libraries whose objects the norms pickle, as JSON: norms pickled by others are not
    loaded (an upgraded detector would load and silently score with the old one)."""
    import platform

    import pyod
    import sklearn

    versions = {
        "format": NORMS_FORMAT,
        "python": ".".join(platform.python_version_tuple()[:2]),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "pyod": pyod.__version__,
    }
    return json.dumps(versions, sort_keys=True)


NORMS_FORMAT = 1  # raise when AnomalyNorms or SegmentStats change shape


def _signature(key: bytes, blob: bytes) -> str:
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def write_scores(
    store: PersonaStore, frame: pd.DataFrame, norms: StoredNorms | None, key: bytes | None
) -> None:
    """Replace the whole table (every device was scored) and the norms, in one transaction. The
    norms are kept only when given and signed with `key`; otherwise none are left."""
    with store.begin() as connection:
        connection.execute(anomaly_scores.delete())
        store.insert_frame(connection, anomaly_scores, frame)
        connection.execute(anomaly_norms.delete())
        if norms is None or key is None:
            return
        blob = pickle.dumps((norms.norms, norms.stats), protocol=pickle.HIGHEST_PROTOCOL)
        row = {
            "space": norms.space,
            "segments_fitted_at": norms.segments_fitted_at,
            "settings": norms.settings,
            "fitted_at": norms.fitted_at,
            "devices": norms.devices,
            "versions": library_versions(),
            "signature": _signature(key, blob),
            "norms": blob,
        }
        connection.execute(anomaly_norms.insert(), [row])


def write_rescored(store: PersonaStore, frame: pd.DataFrame, gone: list[str]) -> None:
    """Between fits: replace the rows of the devices scored again and delete those of the
    devices without a vector, in one transaction."""
    with store.begin() as connection:
        store.delete_in(
            connection, anomaly_scores, anomaly_scores.c.device_id, [*frame["device_id"].tolist(), *gone]
        )
        store.insert_frame(connection, anomaly_scores, frame)


def read_norms_row(store: PersonaStore) -> NormsRow | None:
    """What the stored norms were fitted for (None when none are stored), without loading them."""
    n = anomaly_norms.c
    frame = store.read_frame(
        sa.select(n.space, n.segments_fitted_at, n.settings, n.fitted_at, n.devices, n.versions)
    )
    if frame.empty:
        return None
    row = frame.iloc[0]
    return NormsRow(
        space=str(row["space"]),
        segments_fitted_at=as_utc(frame["segments_fitted_at"]).iloc[0],
        settings=str(row["settings"]),
        fitted_at=as_utc(frame["fitted_at"]).iloc[0],
        devices=int(row["devices"]),
        versions=str(row["versions"]),
    )


def load_norms(store: PersonaStore, row: NormsRow, key: bytes) -> StoredNorms:
    """The stored norms, unpickled only when their signature is this deployment's."""
    n = anomaly_norms.c
    frame = store.read_frame(sa.select(n.norms, n.signature))
    if frame.empty:
        raise NormsUnreadable("they were removed meanwhile")
    blob, signature = bytes(frame["norms"].iloc[0]), str(frame["signature"].iloc[0])
    if not hmac.compare_digest(_signature(key, blob), signature):
        raise NormsUnreadable(
            "their signature is not this deployment's (another PERSONA_NORMS_KEY, or altered)"
        )
    try:
        norms, stats = pickle.loads(blob)  # signed with this deployment's key: checked above
    except Exception as error:  # an unpickling failure can be of any type
        raise NormsUnreadable(f"{type(error).__name__}: {error}") from error
    return StoredNorms(
        space=row.space,
        segments_fitted_at=row.segments_fitted_at,
        settings=row.settings,
        fitted_at=row.fitted_at,
        devices=row.devices,
        norms=norms,
        stats=stats,
    )


def read_unscored(store: PersonaStore) -> tuple[list[str], list[str]]:
    """Devices whose vector or segment is newer than their score (or that have none), and
    devices with a score but no vector any more. Joins on primary keys, in the database."""
    v, c, a = persona_vectors.c, device_clusters.c, anomaly_scores.c
    changed = store.read_frame(
        sa.select(v.device_id)
        .select_from(
            persona_vectors.outerjoin(anomaly_scores, v.device_id == a.device_id).outerjoin(
                device_clusters, v.device_id == c.device_id
            )
        )
        .where(
            sa.or_(
                a.device_id.is_(None),
                c.device_id.is_(None),
                v.computed_at > a.scored_at,
                c.clustered_at > a.scored_at,
            )
        )
        .order_by(v.device_id)
    )
    return changed["device_id"].tolist(), devices_without_a_vector(store, anomaly_scores)


# Devices with a p-value up to the false-discovery rate times this are read whole: a margin over
# the rounding of the procedure's thresholds (rank x fdr / n is fdr at the last rank, to a few ulps).
FDR_READ_MARGIN = 1.0 + 1e-6


@dataclass(frozen=True)
class StoredFlags:
    """The stored scores of the devices not scored again, as flagging the fleet between fits
    needs them."""

    rows: pd.DataFrame  # device_id, p_value, is_anomaly, score, in device_id order
    others: int  # devices left out of `rows`: none flagged, none the false-discovery rate could flag
    top_scores: np.ndarray  # the highest scores of all of them (rows and others), descending


def read_stored_flags(store: PersonaStore, excluded: list[str], fdr: float | None, top: int) -> StoredFlags:
    """The stored scores of every scored device but `excluded`. With `fdr` (the Benjamini-Hochberg
    procedure), only the devices it could flag (p-value at most `fdr`: a larger one passes at no
    rank) and those flagged now are read whole; the others are counted, so what is read follows
    the flags, not the fleet. Without (a contamination share flags the smallest p-values, where
    ties keep the fleet's order), every device is read. `top_scores`: the `top` highest.

    The reads are separate statements: rows an erasure deletes meanwhile can make the count
    disagree with the rows read by as many devices, never below none left out."""
    excluded = list(dict.fromkeys(excluded))
    a = anomaly_scores.c
    query = sa.select(a.device_id, a.p_value, a.is_anomaly, a.score).order_by(a.device_id)
    if fdr is not None:
        query = query.where(sa.or_(a.p_value <= fdr * FDR_READ_MARGIN, a.is_anomaly == sa.true()))
    rows = store.read_frame(query).astype({"is_anomaly": bool, "score": np.float64, "p_value": np.float64})
    rows = rows[~rows["device_id"].isin(excluded)].reset_index(drop=True)
    stored_excluded = store.read_frame_in(sa.select(a.device_id), a.device_id, excluded)["device_id"]
    scored = int(store.scalar(sa.select(sa.func.count()).select_from(anomaly_scores)) or 0)
    top = max(top, 0)
    highest = store.read_frame(
        sa.select(a.device_id, a.score).order_by(a.score.desc()).limit(top + len(stored_excluded))
    )
    top_scores = highest.loc[~highest["device_id"].isin(excluded), "score"].to_numpy(dtype=np.float64)[:top]
    return StoredFlags(rows, max(scored - len(stored_excluded) - len(rows), 0), top_scores)


def count_without_p_value(store: PersonaStore) -> int:
    """Rows scored before p-values were stored."""
    return int(
        store.scalar(
            sa.select(sa.func.count()).select_from(anomaly_scores).where(anomaly_scores.c.p_value.is_(None))
        )
        or 0
    )


def read_scores(store: PersonaStore) -> pd.DataFrame:
    return store.read_frame(sa.select(anomaly_scores).order_by(anomaly_scores.c.score.desc()))


def read_flagged(store: PersonaStore) -> pd.DataFrame:
    """The rows of the flagged devices, the highest score first (what offers and tickets act on)."""
    a = anomaly_scores.c
    return store.read_frame(sa.select(anomaly_scores).where(a.is_anomaly).order_by(a.score.desc()))


def flags_by_kind(store: PersonaStore) -> list[tuple[str | None, int]]:
    """(kind, devices) of the devices flagged, the most frequent kind first."""
    a = anomaly_scores.c
    query = (
        sa.select(a.kind, sa.func.count())
        .where(a.is_anomaly)
        .group_by(a.kind)
        .order_by(sa.func.count().desc())
    )
    with store.engine.connect() as connection:
        return [(kind, int(count)) for kind, count in connection.execute(query).all()]


def read_strangest(store: PersonaStore) -> tuple[str, str] | None:
    """The device with the highest score and its reason, if any device is scored."""
    a = anomaly_scores.c
    with store.engine.connect() as connection:
        row = connection.execute(sa.select(a.device_id, a.reason).order_by(a.score.desc()).limit(1)).first()
    return (row.device_id, row.reason) if row else None
