"""The pipeline's stages, each one asset's body called directly (no Dagster run around it), on
an embedded home: SQLite persona store, Qdrant on a local path, the landing zone.

Calling the asset itself keeps the benchmark honest: it pays for what a run's step pays (store
reads and writes, the metadata a person reads), and cannot drift from the code it measures.
A sampled index write (`index_sample`) runs persona_index on a persona store holding only a
fixed sample of devices, into the real vector index: for an engine too slow to fill at a million
devices (qdrant-client's local mode writes about a thousand points a second). The embedded
default, Qdrant Edge, writes every point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import sqlalchemy as sa

from persona_pipeline.anomalies.assets import AnomalyScoresConfig, anomaly_scores
from persona_pipeline.feedback.assets import (
    KeyWeightsConfig,
    OfferFeedbackConfig,
    key_weights,
    offer_feedback,
    offer_feedback_batches,
)
from persona_pipeline.ingest.assets import IndexUpdatesConfig, index_updates
from persona_pipeline.ingest.ingest import ingest_days
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.personas import storage
from persona_pipeline.personas.assets import (
    PersonaIndexConfig,
    device_profiles,
    persona_index,
    persona_vectors,
)
from persona_pipeline.personas.profiles import (
    device_customers,
    latest_per_device_key,
    value_changes,
)
from persona_pipeline.personas.vectors import build_persona_vectors
from persona_pipeline.personas.weights import record_configured_weights
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.segments.assets import DeviceClustersConfig, SegmentsConfig, device_clusters, segments
from persona_pipeline.store import tables

FEEDBACK_BATCH = "bench-1"


@dataclass
class Home:
    """An embedded home: the persona store, the Qdrant path and the landing zone."""

    root: Path

    def resources(self) -> dict[str, dg.ConfigurableResource]:
        return {
            "persona_store": PersonaStore(
                url=f"sqlite:///{self.root / 'persona.db'}", history_dir=str(self.root / "history")
            ),
            "vector_index": VectorIndex(path=str(self.root / "qdrant")),
            "landing_zone": LandingZone(path=str(self.root / "landing")),
            "persona_config": PersonaConfig(),
        }


@dataclass
class Outcome:
    rows_in: int
    unit: str
    extrapolated_seconds: float | None = None  # a sampled stage's time for every device
    note: str = ""


def _value(result: dg.MaterializeResult, name: str) -> int:
    return int(result.metadata[name].value)


def read_validate(r: dict, day: str, **_) -> Outcome:
    context = dg.build_asset_context(partition_key=day)
    result = index_updates(context, config=IndexUpdatesConfig(), **_pick(r, index_updates))
    return Outcome(_value(result, "rows_read"), "updates")


def profiles_merge(r: dict, day: str, **_) -> Outcome:
    context = dg.build_asset_context(partition_key=day)
    result = device_profiles(context, persona_store=r["persona_store"])
    return Outcome(_value(result, "updates_read"), "updates")


def vectors(r: dict, **_) -> Outcome:
    # personas_job runs key_weights first, which records the configured weights once; here the same
    # call, timed with the stage (a read of the few key_weights rows on the incremental day).
    record_configured_weights(r["persona_store"], r["persona_config"].feature_schema().initial_weights())
    result = persona_vectors(
        dg.build_asset_context(), persona_store=r["persona_store"], persona_config=r["persona_config"]
    )
    computed = result.metadata.get("devices_computed", result.metadata["devices"])
    return Outcome(int(computed.value), "devices")


def index_write(r: dict, index_sample: int | None = None, **_) -> Outcome:
    store: PersonaStore = r["persona_store"]
    devices = storage.read_vector_summaries(store)["device_id"]
    if index_sample is None or index_sample >= len(devices):
        result = persona_index(
            dg.build_asset_context(), config=PersonaIndexConfig(), **_pick(r, persona_index)
        )
        return Outcome(_value(result, "points_written"), "points")
    sample = sample_devices(devices, index_sample)
    sample_store = copy_for_sample(store, store_next_to(store, "index-sample.db"), sample)
    started = time.perf_counter()
    result = persona_index(
        dg.build_asset_context(),
        config=PersonaIndexConfig(),
        persona_store=sample_store,
        vector_index=r["vector_index"],
    )
    seconds = time.perf_counter() - started
    copy_rows(sample_store, store, INDEX_STATE, sample)
    # Devices are sampled evenly, so the sample's share of the fleet is its share of the work.
    scale = len(devices) / index_sample
    return Outcome(
        _value(result, "points_written"),
        "points",
        extrapolated_seconds=seconds * scale,
        note=f"sample of {index_sample:,} of {len(devices):,} devices, time x {scale:.1f}",
    )


def sample_devices(device_ids: pd.Series, size: int) -> list[str]:
    """An even, fixed sample: every k-th device in id order (the same on every day)."""
    ordered = np.sort(device_ids.to_numpy(dtype=object))
    return ordered[np.linspace(0, len(ordered) - 1, size).astype(np.int64)].tolist()


def store_next_to(store: PersonaStore, name: str) -> PersonaStore:
    return PersonaStore(url=f"sqlite:///{Path(sa.make_url(store.resolved_url).database).parent / name}")


# What persona_index reads and writes: the vectors of the sample and their index state.
INDEX_INPUTS = (tables.persona_vectors,)
INDEX_STATE = (tables.vector_index_state,)


def copy_for_sample(store: PersonaStore, sample_store: PersonaStore, devices: list[str]) -> PersonaStore:
    """A persona store holding only the sample's rows of what persona_index reads, so the asset
    itself runs on the sample: the index stage's time is the asset's, whatever the index engine."""
    with sample_store.begin() as connection:
        connection.execute(tables.persona_dimensions.delete())
        sample_store.insert_frame(
            connection, tables.persona_dimensions, store.read_frame(sa.select(tables.persona_dimensions))
        )
    copy_rows(store, sample_store, (*INDEX_INPUTS, *INDEX_STATE), devices)
    return sample_store


def copy_rows(source: PersonaStore, target: PersonaStore, which: tuple, devices: list[str]) -> None:
    """Replace the rows of `devices` in the `which` tables of `target` with those in `source`."""
    for table in which:
        frames = [
            source.read_frame(sa.select(table).where(table.c.device_id.in_(devices[start : start + 10_000])))
            for start in range(0, len(devices), 10_000)
        ]
        with target.begin() as connection:
            for start in range(0, len(devices), 10_000):
                chunk = devices[start : start + 10_000]
                connection.execute(table.delete().where(table.c.device_id.in_(chunk)))
            for frame in frames:
                target.insert_frame(connection, table, frame)


def clustering(r: dict, **_) -> Outcome:
    fit = segments(dg.build_asset_context(), config=SegmentsConfig(), **_pick(r, segments))
    result = device_clusters(
        dg.build_asset_context(), config=DeviceClustersConfig(), **_pick(r, device_clusters)
    )
    note = "assigned to the last fit" if fit.metadata["mode"].value == "kept" else "fit"
    return Outcome(int(result.metadata["devices_assigned"].value), "devices", note=note)


def anomaly_scoring(r: dict, **_) -> Outcome:
    context = dg.build_asset_context()
    result = anomaly_scores(context, config=AnomalyScoresConfig(), **_pick(r, anomaly_scores))
    return Outcome(_value(result, "devices"), "devices")


def recommendations(r: dict, **_) -> Outcome:
    store: PersonaStore = r["persona_store"]
    devices = store.scalar(sa.select(sa.func.count()).select_from(tables.device_clusters))
    service_recommendations(dg.build_asset_context(), **_pick(r, service_recommendations))
    return Outcome(int(devices or 0), "devices")


def feedback_load(r: dict, **_) -> Outcome:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(offer_feedback_batches.name, [FEEDBACK_BATCH])
    context = dg.build_asset_context(partition_key=FEEDBACK_BATCH, instance=instance)
    result = offer_feedback(context, config=OfferFeedbackConfig(), **_pick(r, offer_feedback))
    return Outcome(_value(result, "rows_read"), "responses")


def weights_refresh(r: dict, **_) -> Outcome:
    context = dg.build_asset_context()
    result = key_weights(context, config=KeyWeightsConfig(), **_pick(r, key_weights))
    return Outcome(_value(result, "answered_offers"), "offers")


def in_memory(r: dict, day: str, **_) -> Outcome:
    """Read, validate, merge and vectorize one day with the project's pure functions, nothing
    stored: the work the naive loop does, done the vectorized way."""
    schema = r["persona_config"].feature_schema()
    accepted = ingest_days([day], r["landing_zone"].read_day, schema).accepted
    profiles = latest_per_device_key(accepted)
    as_of = profiles["observed_at"].max()
    changed = {}
    for derived in schema.derived:
        if derived.kind == "changed_within_days":
            history = accepted.loc[accepted["key"] == derived.key, ["device_id", "value", "observed_at"]]
            changed[derived.name] = set(
                value_changes(history, as_of - pd.Timedelta(days=derived.days))["device_id"]
            )
    build_persona_vectors(profiles, device_customers(profiles), schema, schema.initial_weights(), changed)
    return Outcome(len(accepted), "updates")


def _pick(resources: dict, asset: dg.AssetsDefinition) -> dict:
    return {name: resources[name] for name in asset.required_resource_keys if name in resources}


STAGES: dict[str, tuple[str, Callable[..., Outcome]]] = {
    "read_validate": ("read+validate", read_validate),
    "profiles": ("profiles merge", profiles_merge),
    "vectors": ("vectors", vectors),
    "index": ("index write", index_write),
    "clustering": ("clustering", clustering),
    "anomalies": ("anomaly scoring", anomaly_scoring),
    "recommendations": ("recommendations", recommendations),
    "feedback": ("feedback load", feedback_load),
    "weights": ("weights refresh", weights_refresh),
    "in_memory": ("in memory", in_memory),
}
DAY_STAGES = ("read_validate", "profiles", "vectors", "index", "clustering", "anomalies", "recommendations")
LEARNING_STAGES = ("feedback", "weights")


def run_stage(name: str, home: Path, day: str, index_sample: int | None = None) -> tuple[float, Outcome]:
    """Run one stage; its seconds exclude imports and opening the stores."""
    resources = Home(home).resources()
    resources["persona_store"].engine  # noqa: B018  (migrations run on first use: not the stage's cost)
    started = time.perf_counter()
    outcome = STAGES[name][1](resources, day=day, index_sample=index_sample)
    return time.perf_counter() - started, outcome
