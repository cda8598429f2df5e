"""Planted secrets (the Qdrant API key, database passwords) never reach what a run leaves behind:
its event log (every event, metadata, error messages, stack traces), its run record and
snapshots, the captured compute logs, or the console."""

from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from persona_pipeline.definitions import build_resources
from persona_pipeline.feedback.assets import key_weights
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.personas.assets import device_profiles, persona_index, persona_vectors
from persona_pipeline.resources import PersonaStore, VectorIndex
from persona_pipeline.resources.vector_index import VectorIndexError
from persona_pipeline_tests.conftest import update, write_jsonl

# key_weights records the configured weights the vectors are built with.
VECTOR_ASSETS = [key_weights, persona_vectors, persona_index]

PLANTED_KEY = "planted-secret-4c9a7e21"
PLANTED_PASSWORD = "s3cret-planted"
PLANTED_SOURCE_PASSWORD = "src-s3cret-planted"
PLANTED_URL_PASSWORD = "url-s3cret-planted"
PLANTED_URL_TOKEN = "url-token-planted"
PLANTED_QUERY_PASSWORD = "query-s3cret-planted"
DAY = "2026-03-01"


def run_records(instance: dg.DagsterInstance, run_id: str) -> str:
    """Everything the instance keeps of a run, as text."""
    run = instance.get_run_by_id(run_id)
    return "\n".join(
        [
            *(dg.serialize_value(record) for record in instance.all_logs(run_id)),
            dg.serialize_value(run),
            dg.serialize_value(instance.get_job_snapshot(run.job_snapshot_id)),
            dg.serialize_value(instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)),
        ]
    )


def compute_logs(instance: dg.DagsterInstance) -> str:
    files = [p for p in Path(instance.root_directory).rglob("compute_logs/*") if p.is_file()]
    assert any(p.stat().st_size for p in files), "no captured compute logs to search"
    return "\n".join(p.read_text(errors="replace") for p in files)


def fill_source(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE TABLE index_updates (device_id text, customer_id text, key text, value text,"
                " observed_at text)"
            )
        )
        connection.execute(
            sa.text("INSERT INTO index_updates VALUES (:d, NULL, 'device.location.city', 'Berlin', :at)"),
            [{"d": d, "at": f"{DAY}T10:00:00Z"} for d in ("d1", "d2")],
        )
    engine.dispose()


@pytest.mark.store_agnostic  # both backends are parametrized here
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_planted_secrets_never_reach_what_a_run_leaves_behind(
    store, request, landing, instance, monkeypatch, capfd, caplog
):

    secrets = [PLANTED_KEY, PLANTED_URL_PASSWORD, PLANTED_URL_TOKEN]
    # Credentials can also ride in the URL itself: its userinfo and its query.
    monkeypatch.setenv(
        "QDRANT_URL", f"http://qdrant:{PLANTED_URL_PASSWORD}@127.0.0.1:9/?api_key={PLANTED_URL_TOKEN}"
    )
    monkeypatch.setenv("QDRANT_API_KEY", PLANTED_KEY)
    if store == "postgresql":
        create_database = request.getfixturevalue("postgres_database")
        # libpq's sslpassword (used only for an encrypted client key): a secret in the URL's query.
        store_url = f"{create_database(PLANTED_PASSWORD)}?sslpassword={PLANTED_QUERY_PASSWORD}"
        source_url = create_database(PLANTED_SOURCE_PASSWORD)
        fill_source(source_url)
        monkeypatch.setenv("PERSONA_DB_URL", store_url)
        monkeypatch.setenv("PERSONA_SOURCE_DB_URL", source_url)
        secrets += [PLANTED_PASSWORD, PLANTED_SOURCE_PASSWORD, PLANTED_QUERY_PASSWORD]
    else:
        write_jsonl(
            landing,
            DAY,
            [update(d, "device.location.city", "Berlin", f"{DAY}T10:00:00Z") for d in ("d1", "d2")],
        )
    resources = build_resources()  # as the code location has them: secrets as EnvVar

    ingested = dg.materialize(
        [index_updates, device_profiles], resources=resources, instance=instance, partition_key=DAY
    )
    assert ingested.success
    assert ingested.asset_materializations_for_node("index_updates")[0].metadata["rows_accepted"].value == 2
    failed = dg.materialize(
        VECTOR_ASSETS,
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    assert not failed.success
    failures = [e for e in failed.all_events if e.is_step_failure]
    assert failures and failures[0].step_key == "persona_index"
    failed_records = run_records(instance, failed.run_id)
    assert "vector index at http://qdrant:***@127.0.0.1:9/?api_key=***" in failed_records  # it says where

    console = capfd.readouterr()
    left_behind = "\n".join(
        [
            run_records(instance, ingested.run_id),
            failed_records,
            compute_logs(instance),
            console.out,
            console.err,
            caplog.text,
        ]
    )
    for secret in secrets:
        assert secret not in left_behind
    if store == "postgresql":  # the runs did use the planted URLs
        with sa.create_engine(store_url).connect() as connection:
            profiled = connection.execute(sa.text("SELECT count(DISTINCT device_id) FROM device_profiles"))
            assert profiled.scalar() == 2


@pytest.mark.store_agnostic
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://app:{PLANTED_PASSWORD}@db:5432/persona?sslpassword={PLANTED_QUERY_PASSWORD}",
        f"http://qdrant:{PLANTED_URL_PASSWORD}@qdrant.example:6333/?api_key={PLANTED_URL_TOKEN}",
    ],
)
def test_where_a_store_or_index_is_shown_its_url_has_no_credentials(url):
    shown = [PersonaStore(url=url).display_url, VectorIndex(url=url).location]
    shown.append(str(VectorIndexError(f"vector index at {url} failed", detail=f"refused by {url}")))
    planted = [PLANTED_PASSWORD, PLANTED_QUERY_PASSWORD, PLANTED_URL_PASSWORD, PLANTED_URL_TOKEN]
    for text in shown:
        assert "***" in text and not [secret for secret in planted if secret in text]
