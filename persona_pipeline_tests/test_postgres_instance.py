"""Dagster's own instance storage on PostgreSQL (deploy/dagster-postgres.yaml), from the
environment, as the README's production section sets it up."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from persona_pipeline.app.cli import main
from persona_pipeline.definitions import defs
from persona_pipeline_tests.conftest import fresh_postgres_url, resources_for, update, write_jsonl

# About Dagster's instance on PostgreSQL; runs once.
pytestmark = pytest.mark.store_agnostic

PASSWORD = "s3cret-planted-in-DAGSTER_PG_URL"


def test_runs_and_events_land_in_postgres_and_the_password_stays_in_the_environment(
    persona_home, landing, monkeypatch: pytest.MonkeyPatch
):
    url = sa.make_url(fresh_postgres_url(f"instance-{persona_home}"))
    # The loopback server trusts loopback connections: any password works.
    dagster_url = url.set(drivername="postgresql+psycopg2", password=PASSWORD)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_url.render_as_string(hide_password=False))
    assert main(["init", "--instance", "postgres"]) == 0
    dagster_home = persona_home / "dagster"
    assert "storage:\n  postgres:" in (dagster_home / "dagster.yaml").read_text()
    assert PASSWORD not in (dagster_home / "dagster.yaml").read_text()

    write_jsonl(landing, "2026-03-01", [update("d1", "device.model", "Pixel 8", "2026-03-01T08:00:00+00:00")])
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = dg.materialize(
            [defs.get_assets_def("index_updates"), defs.get_assets_def("device_profiles")],
            resources=resources_for(persona_home),
            instance=instance,
            partition_key="2026-03-01",
        )
        assert result.success
        logged = " ".join(repr(event) for event in instance.all_logs(result.run_id))

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        runs = connection.execute(sa.text("select count(*) from runs")).scalar()
        materializations = connection.execute(
            sa.text("select count(*) from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION'")
        ).scalar()
    engine.dispose()
    assert (runs, materializations) == (1, 2)
    assert PASSWORD not in logged
