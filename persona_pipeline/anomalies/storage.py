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
