"""The personas domain's job."""

import dagster as dg

from persona_pipeline.personas.assets import persona_index, persona_vectors

personas_job = dg.define_asset_job(
    "personas_job",
    selection=dg.AssetSelection.assets(persona_vectors, persona_index),
    description="Rebuild persona vectors from the profiles and bring the Qdrant index up to date.",
)
