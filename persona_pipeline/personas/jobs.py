"""The personas domain's job."""

import dagster as dg

from persona_pipeline.personas.assets import KEY_WEIGHTS, persona_index, persona_vectors

personas_job = dg.define_asset_job(
    "personas_job",
    selection=dg.AssetSelection.assets(KEY_WEIGHTS, persona_vectors, persona_index),
    description="Bring the key weights up to date (record edited configured weights; learn from "
    "feedback not learned from yet), rebuild the persona vectors with the live version and bring the "
    "Qdrant index up to date.",
)
