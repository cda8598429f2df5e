"""The one code location: every asset, check, job and resource of persona_pipeline."""

import os

import dagster as dg

from persona_pipeline import settings
from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.automation import automation_sensor, dead_runs_sensor
from persona_pipeline.erasure.jobs import erase_devices_job
from persona_pipeline.executors import executor_from_env
from persona_pipeline.feature_schema import load_feature_schema
from persona_pipeline.feedback.assets import key_weights, offer_feedback
from persona_pipeline.feedback.jobs import feedback_job, weights_job
from persona_pipeline.feedback.sensors import (
    configured_weights_sensor,
    key_weights_sensor,
    offer_feedback_sensor,
)
from persona_pipeline.ingest.assets import index_updates
from persona_pipeline.ingest.jobs import ingest_job, ingest_schedule
from persona_pipeline.ingest.sensors import index_updates_sensor
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.offers.jobs import DECISION_JOBS
from persona_pipeline.personas.assets import device_profiles, persona_index, persona_vectors
from persona_pipeline.personas.jobs import personas_job
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.segments.assets import device_clusters, segments
from persona_pipeline.service_catalog import load_service_catalog


def build_resources(resolved: bool = False) -> dict[str, dg.ConfigurableResource]:
    """The resources, configured from environment variables: as `EnvVar`s for Dagster (the UI
    shows a variable's name, never its value), or `resolved` to their values for use outside a
    run (the command line's summaries)."""

    def from_env(name: str) -> dg.EnvVar | str | None:
        value = os.environ.get(name) or None
        return value if resolved or value is None else dg.EnvVar(name)

    return {
        "persona_store": PersonaStore(url=from_env("PERSONA_DB_URL")),
        "vector_index": VectorIndex(
            url=from_env("QDRANT_URL"),
            api_key=from_env("QDRANT_API_KEY"),
            embedded_engine=os.environ.get("PERSONA_QDRANT_ENGINE") or "edge",
            **settings.qdrant_server_layout(os.environ),
        ),
        "landing_zone": LandingZone(
            path=from_env("PERSONA_LANDING_DIR"), source_db_url=from_env("PERSONA_SOURCE_DB_URL")
        ),
        "persona_config": PersonaConfig(config_dir=from_env("PERSONA_CONFIG_DIR")),
    }


# Fail at load time, with the file, entry or variable named, when the configuration is invalid.
settings.history_shards()
load_feature_schema(os.environ.get("PERSONA_CONFIG_DIR"))
load_service_catalog(os.environ.get("PERSONA_CONFIG_DIR"))

defs = dg.Definitions(
    assets=[
        index_updates,
        device_profiles,
        persona_vectors,
        persona_index,
        segments,
        device_clusters,
        anomaly_scores,
        service_recommendations,
        offer_feedback,
        key_weights,
    ],
    jobs=[ingest_job, personas_job, *DECISION_JOBS, feedback_job, weights_job, erase_devices_job],
    schedules=[ingest_schedule],
    sensors=[
        index_updates_sensor,
        offer_feedback_sensor,
        key_weights_sensor,
        configured_weights_sensor,
        automation_sensor,
        dead_runs_sensor,
    ],
    resources=build_resources(),
    executor=executor_from_env(),
)


def job_named(name: str) -> dg.JobDefinition:
    """A job of `defs` by name: what a Celery worker calls to rebuild a job the CLI submitted."""
    return defs.resolve_job_def(name)
