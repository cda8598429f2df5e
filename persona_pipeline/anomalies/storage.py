"""Reads and writes of the anomalies domain in the persona store."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.store.tables import anomaly_scores


def write_scores(store: PersonaStore, frame: pd.DataFrame) -> None:
    """Replace the whole table (every device is scored each run) in one transaction."""
    with store.begin() as connection:
        connection.execute(anomaly_scores.delete())
        store.insert_frame(connection, anomaly_scores, frame)


def read_scores(store: PersonaStore) -> pd.DataFrame:
    return store.read_frame(sa.select(anomaly_scores).order_by(anomaly_scores.c.score.desc()))


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
