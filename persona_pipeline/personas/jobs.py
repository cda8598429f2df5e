"""The personas domain's job."""

import dagster as dg

from persona_pipeline.partitions import DEVICE_SHARDS
from persona_pipeline.personas.assets import KEY_WEIGHTS, persona_index, persona_vectors

# With device shards the vectors are partitioned by shard: a run per shard, and the fleet-wide
# key weights and index run in weights_job and segments_job.
personas_job = (
    dg.define_asset_job(
        "personas_job",
        selection=dg.AssetSelection.assets(KEY_WEIGHTS, persona_vectors, persona_index),
        description="Bring the key weights up to date (record edited configured weights; learn from "
        "feedback not learned from yet), rebuild the persona vectors with the live version and bring "
        "the Qdrant index up to date.",
    )
    if DEVICE_SHARDS == 1
    else dg.define_asset_job(
        "personas_job",
        selection=dg.AssetSelection.assets(persona_vectors),
        description="Rebuild one device shard's persona vectors with the live key weights (a run per "
        "shard; segments_job brings the Qdrant index up to date).",
    )
)
