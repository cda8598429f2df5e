"""The persona store on PostgreSQL gives the same results as on SQLite: the same fleet through
every asset and a feedback round, table by table."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.resources.update_history import UpdateHistory
from persona_pipeline.store.tables import metadata
from persona_pipeline_tests.conftest import ENV_VARIABLES, fresh_postgres_url

# Both backends are in this one test.
pytestmark = pytest.mark.store_agnostic

# When a run happened, not what it computed.
WALL_CLOCK = {
    "created_at",
    "rejected_at",
    "computed_at",
    "clustered_at",
    "fitted_at",
    "segments_fitted_at",  # anomaly_norms: the fitted_at of the segments it was scored against
    "scored_at",
    "first_seen_at",
    "last_seen_at",
    "requested_at",
    "completed_at",
    "suppressed_at",
    "updated_at",
    "resolved_at",
    "hold_until",
    # A random id per write of a feedback batch, and the list of them a refresh learned from.
    "load_id",
    "loads",
    # When persona_index wrote a point, and the write whose point got its cluster_id payload.
    "written",
    "point_written",
    # The anomaly norms themselves, pickled, with their signature and the libraries that pickled
    # them: compared through the scores they give.
    "norms",
    "signature",
    "versions",
}


def run_fleet(home: Path, db_url: str | None, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
    from persona_pipeline.app.runner import run_chain, simulate_feedback
    from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing

    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PERSONA_HOME", str(home))
    if db_url:
        monkeypatch.setenv("PERSONA_DB_URL", db_url)
    fleet = generate_fleet(400, 4, seed=6, start="2026-03-01")
    write_landing(fleet, home / "landing")
    write_ground_truth(fleet, home / "ground_truth")
    with dg.instance_for_test() as instance:
        run_chain("2026-03-01", "2026-03-03", instance=instance)
        simulate_feedback(seed=1, batch_id=None)
        run_chain(None, None, instance=instance)
    return sa.create_engine(db_url or f"sqlite:///{home / 'persona.db'}")


def comparable(engine: sa.Engine, table: sa.Table) -> pd.DataFrame:
    with engine.connect() as connection:
        result = connection.execute(sa.select(table))
        frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    frame = frame.drop(columns=[c for c in frame.columns if c in WALL_CLOCK])
    for column in frame.columns:
        if isinstance(table.c[column].type, sa.DateTime):
            frame[column] = pd.to_datetime(frame[column], utc=True)
    keys = [c.name for c in table.primary_key.columns] or list(frame.columns)
    return frame.sort_values(keys).reset_index(drop=True)


def test_every_table_is_the_same_on_sqlite_and_postgresql(tmp_path, monkeypatch):
    postgres_url = fresh_postgres_url(f"agree-{tmp_path}")
    on_sqlite = run_fleet(tmp_path / "sqlite", None, monkeypatch)
    on_postgres = run_fleet(tmp_path / "postgres", postgres_url, monkeypatch)
    compared = []
    for name, table in metadata.tables.items():
        expected, got = comparable(on_sqlite, table), comparable(on_postgres, table)
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, obj=name)
        compared.append((name, len(expected)))
    on_postgres.dispose()
    history = [
        UpdateHistory(tmp_path / home / "history")
        .read()
        .sort_values(["partition_date", "source_file", "source_row"])
        for home in ("sqlite", "postgres")
    ]
    assert len(history[0]) > 0
    pd.testing.assert_frame_equal(history[1].reset_index(drop=True), history[0].reset_index(drop=True))
    filled = {name for name, rows in compared if rows}
    assert {"device_profiles", "anomaly_scores", "service_recommendations", "key_weight_refreshes"} <= filled
