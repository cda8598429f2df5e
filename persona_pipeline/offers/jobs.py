"""The day's decisions as one job: segments, anomaly scores and offers (offers read the other two)."""

import dagster as dg

from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.segments.assets import device_clusters

segments_job = dg.define_asset_job(
    "segments_job",
    selection=dg.AssetSelection.assets(device_clusters, anomaly_scores, service_recommendations),
    description="Segment the devices by persona vector, score anomalies with reasons, and make offers.",
)
