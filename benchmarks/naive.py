"""The naive baseline: the seed's design as written, on the same landing files.

A Python loop over every key-value update: look up the key's feature, read the value,
multiply by the weight, and keep it in a per-device dict (the latest by observed_at wins);
then one vector-store upsert per device into Qdrant on a local path. Key lookups are cached
and bad rows skipped, so the loop is a fair one, not a straw man.

`python -m benchmarks.naive --landing L --day D --qdrant DIR [--upsert-sample 2000]`: upserts
at a million devices would take an hour, so they are timed on a sample and extrapolated.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
from qdrant_client import QdrantClient, models

from benchmarks.measure import report
from persona_pipeline.feature_schema import OTHER, FeatureSchema, load_feature_schema

NAMESPACE = uuid.UUID("6f1d3c0e-5b7a-4c1e-9a43-2f0d8e6b7c51")


def naive_vectors(files: list[Path], schema: FeatureSchema) -> tuple[dict[str, list[float]], int]:
    """Per device, its weighted vector (a list), and the number of updates looped over."""
    weights = schema.initial_weights()
    position = {name: i for i, name in enumerate(schema.dimension_names)}
    features: dict[str, object] = {}
    latest: dict[str, dict[str, tuple[datetime, int, float]]] = {}
    rows = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
            for row in batch.to_pylist():
                rows += 1
                device, key, value = row["device_id"], row["key"], row["value"]
                if not device or key is None or value is None:
                    continue
                if key not in features:
                    features[key] = schema.feature_for(key)
                feature = features[key]
                if feature is None:
                    continue
                try:
                    observed = datetime.fromisoformat(row["observed_at"])
                except (TypeError, ValueError):
                    continue
                if observed.tzinfo is None:
                    continue
                dimension, number = _dimension_value(feature, key, value, position)
                if dimension is None:
                    continue
                entries = latest.setdefault(device, {})
                previous = entries.get(key)
                if previous is None or observed >= previous[0]:
                    entries[key] = (observed, dimension, number * weights[feature.key])
    size = len(position)
    vectors = {}
    for device, entries in latest.items():
        vector = [0.0] * size
        for _, dimension, weighted in entries.values():
            vector[dimension] = weighted
        vectors[device] = vector
    return vectors, rows


def _dimension_value(feature, key: str, value: str, position: dict[str, int]) -> tuple[int | None, float]:
    if feature.type == "categorical":
        return position.get(f"{key}={value}", position[f"{key}={OTHER}"]), 1.0
    if feature.type == "boolean":
        return position[key], 1.0 if value.lower() == "true" else 0.0
    try:
        number = float(value)
    except ValueError:
        return None, 0.0
    if not math.isfinite(number):
        return None, 0.0
    low, high = feature.transform.clip
    number = min(max(number, low), high)
    if feature.transform.log1p:
        number, low, high = math.log1p(number), math.log1p(low), math.log1p(high)
    dimension = position.get(key, position.get(f"{feature.key}[{OTHER}]"))
    return dimension, (number - low) / (high - low)


def upsert_one_by_one(vectors: dict[str, list[float]], qdrant: Path, sample: int) -> tuple[int, float]:
    """One upsert per device for `sample` devices; (devices upserted, seconds)."""
    client = QdrantClient(path=str(qdrant))
    try:
        size = len(next(iter(vectors.values())))
        client.create_collection(
            "naive", vectors_config=models.VectorParams(size=size, distance=models.Distance.EUCLID)
        )
        chosen = list(vectors)[:sample]
        started = time.perf_counter()
        for device in chosen:
            client.upsert(
                "naive",
                points=[
                    models.PointStruct(
                        id=str(uuid.uuid5(NAMESPACE, device)),
                        vector=vectors[device],
                        payload={"device_id": device},
                    )
                ],
            )
        return len(chosen), time.perf_counter() - started
    finally:
        client.close()


def run(landing: Path, day: str, qdrant: Path, upsert_sample: int) -> tuple[float, dict]:
    """The loop's seconds, and what it did (upserts timed on a sample, then extrapolated)."""
    files = sorted((landing / "index_updates" / f"date={day}").glob("*.parquet"))
    schema = load_feature_schema()
    started = time.perf_counter()
    vectors, rows = naive_vectors(files, schema)
    loop_seconds = time.perf_counter() - started
    upserted, upsert_seconds = upsert_one_by_one(vectors, qdrant, upsert_sample)
    return loop_seconds, {
        "rows": rows,
        "devices": len(vectors),
        "upserted": upserted,
        "upsert_seconds": upsert_seconds,
        "upsert_seconds_all": upsert_seconds / max(upserted, 1) * len(vectors),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--landing", required=True, type=Path)
    parser.add_argument("--day", required=True)
    parser.add_argument("--qdrant", required=True, type=Path)
    parser.add_argument("--upsert-sample", type=int, default=2_000)
    args = parser.parse_args()
    seconds, details = run(args.landing, args.day, args.qdrant, args.upsert_sample)
    report(seconds, **details)


if __name__ == "__main__":
    main()
