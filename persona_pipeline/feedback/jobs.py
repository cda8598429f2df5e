"""The feedback domain's jobs: load one batch, learn the weights."""

import dagster as dg

from persona_pipeline.feedback.assets import key_weights, offer_feedback

feedback_job = dg.define_asset_job(
    "feedback_job",
    selection=dg.AssetSelection.assets(offer_feedback),
    description="Load one feedback batch (a dynamic partition) into offer_feedback.",
)


weights_job = dg.define_asset_job(
    "weights_job",
    selection=dg.AssetSelection.assets(key_weights),
    description="Learn a new key_weights version from feedback not learned from yet.",
)
