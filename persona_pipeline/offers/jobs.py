"""The day's decisions as one job: segments, anomaly scores and offers (offers read the other two)."""

import dagster as dg

from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.partitions import DEVICE_SHARDS
from persona_pipeline.personas.assets import persona_index
from persona_pipeline.segments.assets import device_clusters

# With device shards, personas_job runs a shard's vectors only: the index, fleet-wide, runs here.
segments_job = dg.define_asset_job(
    "segments_job",
    selection=dg.AssetSelection.assets(device_clusters, anomaly_scores, service_recommendations)
    | (dg.AssetSelection.assets(persona_index) if DEVICE_SHARDS > 1 else dg.AssetSelection.assets()),
    description="Segment the devices by persona vector, score anomalies with reasons, and make offers"
    + (" (first, the Qdrant index takes every shard's vectors)." if DEVICE_SHARDS > 1 else "."),
)
