"""A planted Qdrant API key never reaches the run's event log, metadata or error messages."""

import dagster as dg

from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.personas.assets import device_profiles, persona_index, persona_vectors
from persona_pipeline.resources import VectorIndex
from persona_pipeline_tests.conftest import update, write_jsonl

PLANTED_KEY = "planted-secret-4c9a7e21"


def test_unreachable_qdrant_fails_clearly_without_leaking_the_api_key(landing, resources, instance):
    write_jsonl(
        landing, "2026-03-01", [update("d1", "device.location.city", "Berlin", "2026-03-01T10:00:00Z")]
    )
    assert dg.materialize(
        [index_updates, device_profiles], resources=resources, instance=instance, partition_key="2026-03-01"
    ).success
    unreachable = {
        **resources,
        "vector_index": VectorIndex(url="http://127.0.0.1:9", api_key=PLANTED_KEY, timeout_seconds=2),
    }
    result = dg.materialize(
        [persona_vectors, persona_index], resources=unreachable, instance=instance, raise_on_error=False
    )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures and failures[0].step_key == "persona_index"

    logged = "\n".join(str(record) for record in instance.all_logs(result.run_id))
    assert "127.0.0.1:9" in logged  # the failure says where it could not write
    assert PLANTED_KEY not in logged
