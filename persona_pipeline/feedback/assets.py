"""Feedback: responses to offers, one dynamic partition per batch, picked up by a sensor."""

import json

import dagster as dg
import pandas as pd
from pydantic import Field

from persona_pipeline.feedback import storage
from persona_pipeline.feedback.validation import FEEDBACK_FIELDS, validate_feedback
from persona_pipeline.metadata import counts_table, markdown_table
from persona_pipeline.resources import LandingZone, PersonaStore
from persona_pipeline.retries import STORE_RETRY

offer_feedback_batches = dg.DynamicPartitionsDefinition(name="offer_feedback_batches")
FEEDBACK_REJECT_CHECK = "feedback_reject_share_within_threshold"


class OfferFeedbackConfig(dg.Config):
    max_reject_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="The reject-share check fails when more than this share of a batch's rows is rejected.",
    )


@dg.asset(
    partitions_def=offer_feedback_batches,
    group_name="feedback",
    kinds={"pandas", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            FEEDBACK_REJECT_CHECK,
            asset="offer_feedback",
            description="Share of rejected rows in the batch stays within the threshold (default 5%).",
        )
    ],
)
def offer_feedback(
    context: dg.AssetExecutionContext,
    config: OfferFeedbackConfig,
    persona_store: PersonaStore,
    landing_zone: LandingZone,
) -> dg.MaterializeResult:
    """Responses (accepted, rejected, used, dismissed) to offers, from one complete feedback batch
    `offer_feedback/batch=<id>/` (with `_SUCCESS`). Rows for unknown offers, unknown responses or
    bad timestamps go to `offer_feedback_rejects` with a reason; re-processing replaces the batch."""
    batch_id = context.partition_key
    read = landing_zone.read_feedback_batch(batch_id)
    rows = read.rows.reindex(columns=[*FEEDBACK_FIELDS, "source_file", "source_row", "raw"])
    known = storage.known_offer_ids(persona_store, rows["offer_id"].dropna().astype(str).unique().tolist())
    responses, rejects = validate_feedback(rows, known, batch_id)
    unreadable = read.rejects.assign(batch_id=batch_id, reason_code="unreadable")
    rejects = pd.concat([unreadable, rejects], ignore_index=True).assign(
        rejected_at=pd.Timestamp.now(tz="UTC")
    )
    storage.write_batch(persona_store, batch_id, responses, rejects)
    for problem in read.problems:
        context.log.warning(problem)

    total = len(rows) + len(read.rejects)
    share = len(rejects) / total if total else 0.0
    positive = responses["response"].isin(["accepted", "used"])
    passed = share <= config.max_reject_share
    return dg.MaterializeResult(
        metadata={
            "batch_id": dg.MetadataValue.text(batch_id),
            "rows_read": dg.MetadataValue.int(total),
            "responses": dg.MetadataValue.int(len(responses)),
            "rejected": dg.MetadataValue.int(len(rejects)),
            "offers_answered": dg.MetadataValue.int(int(responses["offer_id"].nunique())),
            "acceptance_rate": dg.MetadataValue.float(
                round(
                    float(
                        responses.loc[positive, "offer_id"].nunique()
                        / max(responses["offer_id"].nunique(), 1)
                    ),
                    4,
                )
            ),
            "responses_by_kind": counts_table(responses["response"].value_counts(), "response", "rows"),
            "rejects_by_reason": counts_table(rejects["reason_code"].value_counts(), "reason", "rows"),
            "reject_examples": markdown_table(rejects[["source_file", "source_row", "reason"]], max_rows=5),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=FEEDBACK_REJECT_CHECK,
                passed=passed,
                metadata={"reject_share": share, "threshold": config.max_reject_share},
                description=None if passed else f"{share:.1%} of the batch rejected",
            )
        ],
    )


feedback_job = dg.define_asset_job(
    "feedback_job",
    selection=dg.AssetSelection.assets(offer_feedback),
    partitions_def=offer_feedback_batches,
    description="Load one feedback batch (a dynamic partition) into offer_feedback.",
)


@dg.sensor(job=feedback_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def offer_feedback_sensor(context: dg.SensorEvaluationContext, landing_zone: LandingZone) -> dg.SensorResult:
    """Each tick: complete feedback batches (`_SUCCESS` present) not seen before become partitions
    of offer_feedback, with one run each. The run key is the batch id and the cursor remembers the
    batches seen, so a batch is never processed twice, even after a restart."""
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    new = [batch for batch in landing_zone.complete_feedback_batches() if batch not in seen]
    if not new:
        return dg.SensorResult(skip_reason="no new complete feedback batch")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=batch, run_key=batch) for batch in new],
        dynamic_partitions_requests=[offer_feedback_batches.build_add_request(new)],
        cursor=json.dumps(sorted(seen | set(new))),
    )
