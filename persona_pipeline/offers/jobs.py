"""The day's decisions: segments, each device's segment, anomaly scores and offers (offers read
the other two). On one shard, one job; with device shards, three, because each device's segment
runs a partition per shard between the fleet-wide steps."""

import dagster as dg

from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.partitions import DEVICE_SHARDS
from persona_pipeline.personas.assets import persona_index
from persona_pipeline.segments.assets import device_clusters, segments

DECISIONS = dg.AssetSelection.assets(anomaly_scores, service_recommendations)

segments_job = (
    dg.define_asset_job(
        "segments_job",
        selection=dg.AssetSelection.assets(segments, device_clusters) | DECISIONS,
        description="Fit the segments (weekly, or when many devices changed), give each device its "
        "segment, score anomalies with reasons, and make offers.",
    )
    if DEVICE_SHARDS == 1
    # With device shards, personas_job runs a shard's vectors only: the index, fleet-wide, runs here.
    else dg.define_asset_job(
        "segments_job",
        selection=dg.AssetSelection.assets(persona_index, segments),
        description="Bring the Qdrant index up to date with every shard's vectors and fit the segments "
        "(weekly, or when many devices changed); clusters_job then assigns each shard's devices.",
    )
)
clusters_job = dg.define_asset_job(
    "clusters_job",
    selection=dg.AssetSelection.assets(device_clusters),
    description="Give one device shard's devices their segment of the last fit (a run per shard); "
    "decisions_job then scores and offers.",
)
decisions_job = dg.define_asset_job(
    "decisions_job",
    selection=DECISIONS,
    description="Score anomalies with reasons and make offers, over every shard's devices.",
)
# The jobs of this shard count, in the order a day runs them.
DECISION_JOBS = [segments_job] if DEVICE_SHARDS == 1 else [segments_job, clusters_job, decisions_job]
