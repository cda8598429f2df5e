"""The metadata and check results offer_feedback and key_weights show in the UI."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

from persona_pipeline.feedback.gate import Evidence
from persona_pipeline.feedback.learning import LearnedWeights
from persona_pipeline.feedback.storage import Candidate
from persona_pipeline.feedback.validation import LoadedFeedback
from persona_pipeline.metadata import counts_table, markdown_table, reject_share_check
from persona_pipeline.offers.recommend import POSITIVE_RESPONSES

FEEDBACK_REJECT_CHECK = "feedback_reject_share_within_threshold"
GATE_CHECK = "live_weights_not_worse_than_initial"


def batch_metadata(
    batch_id: str, rows_read: int, loaded: LoadedFeedback, rejects: pd.DataFrame
) -> dict[str, dg.MetadataValue]:
    """A feedback batch: its rows, responses, rejects and held rows, and the held rows of other
    batches that this run turned into responses or rejects."""
    own = rejects["batch_id"] == batch_id
    responses = loaded.responses[loaded.responses["batch_id"] == batch_id]
    held_here = int((loaded.held["batch_id"] == batch_id).sum())
    latest = responses.sort_values("responded_at").drop_duplicates("offer_id", keep="last")
    other_batches = loaded.responses[loaded.responses["batch_id"] != batch_id]
    return {
        "batch_id": dg.MetadataValue.text(batch_id),
        "rows_read": dg.MetadataValue.int(rows_read),
        "responses": dg.MetadataValue.int(len(responses)),
        "rejected": dg.MetadataValue.int(int(own.sum())),
        "held": dg.MetadataValue.int(held_here),
        "held_in_other_batches": dg.MetadataValue.int(len(loaded.held) - held_here),
        "held_rows_now_responses": dg.MetadataValue.int(len(other_batches)),
        "held_rows_now_rejected": dg.MetadataValue.int(int((~own).sum())),
        "offers_answered": dg.MetadataValue.int(len(latest)),
        # Each offer counted by its latest answer in the batch.
        "acceptance_rate": dg.MetadataValue.float(
            round(float(latest["response"].isin(POSITIVE_RESPONSES).mean()) if len(latest) else 0.0, 4)
        ),
        "responses_by_kind": counts_table(responses["response"].value_counts(), "response", "rows"),
        "rejects_by_reason": counts_table(rejects["reason_code"].value_counts(), "reason", "rows"),
        "reject_examples": markdown_table(
            rejects[["batch_id", "source_file", "source_row", "reason"]], max_rows=5
        ),
    }


def batch_reject_check(
    batch_id: str, rows_read: int, rejects: pd.DataFrame, max_reject_share: float
) -> dg.AssetCheckResult:
    """Fails when more than `max_reject_share` of the batch's rows were rejected."""
    rejected = int((rejects["batch_id"] == batch_id).sum())
    share = rejected / rows_read if rows_read else 0.0
    return reject_share_check(
        FEEDBACK_REJECT_CHECK, share, max_reject_share, rejected, rows_read, "offer_feedback_rejects"
    )


def _common_metadata(
    history: pd.DataFrame, live_version: int, recorded: int | None
) -> dict[str, dg.MetadataValue]:
    return {
        "acceptance_by_weights_version": markdown_table(history, max_rows=50),
        "weights_version_in_use": dg.MetadataValue.int(live_version),
        "configured_weights_recorded_as": dg.MetadataValue.int(recorded or 0),
    }


def no_new_feedback_result(
    history: pd.DataFrame, live_version: int, recorded: int | None
) -> dg.MaterializeResult:
    """A refresh with no feedback to learn from: the acceptance history and what is live."""
    return dg.MaterializeResult(
        metadata={
            **_common_metadata(history, live_version, recorded),
            "live_version_changed": dg.MetadataValue.bool(recorded is not None),
            "decision": dg.MetadataValue.text(
                "none: no new feedback" + ("; the configured weights are live" if recorded else "")
            ),
        },
        check_results=[
            dg.AssetCheckResult(check_name=GATE_CHECK, passed=True, description="no new feedback")
        ],
    )


def refresh_outcome(candidate: Candidate | None) -> str:
    """The refresh's outcome in a sentence, for the log."""
    if candidate is None:
        return "no candidate: nothing changed"
    return f"candidate v{candidate.version} {_verdict(candidate)}: {candidate.reason}"


def refresh_metadata(
    *,
    history: pd.DataFrame,
    live_version: int,
    recorded: int | None,
    in_use: int,
    candidate: Candidate | None,
    learned: LearnedWeights,
    weight_decisions: pd.DataFrame,
    batches: list[str],
    answered_offers: int,
    learned_rows: np.ndarray,
) -> dict[str, dg.MetadataValue]:
    """A refresh that learned: the candidate and the gate's decision on it, its evidence, what it
    learned from and the live weights against the candidate's (`learned_rows`: the answered offers
    learned from; the others were held out)."""
    decision = "none: nothing changed" if candidate is None else candidate.reason
    table = learned.table.assign(change=(learned.table["new"] - learned.table["old"]).round(4))
    return {
        **_common_metadata(history, live_version, recorded),
        "weights_version_in_use": dg.MetadataValue.int(in_use),
        "live_version_changed": dg.MetadataValue.bool(in_use != live_version or recorded is not None),
        "candidate_version": dg.MetadataValue.int(candidate.version if candidate else 0),
        "decision": dg.MetadataValue.text(
            decision if candidate is None else f"{_verdict(candidate)}: {decision}"
        ),
        "evidence": markdown_table(_evidence_rows(candidate), max_rows=20),
        "weight_decisions": markdown_table(weight_decisions, max_rows=20),
        "learned_from_batches": dg.MetadataValue.text(", ".join(batches)),
        "answered_offers": dg.MetadataValue.int(answered_offers),
        "held_out_offers": dg.MetadataValue.int(int((~learned_rows).sum())),
        "responses_by_trigger": counts_table(pd.Series(learned.responses_by_trigger), "trigger", "offers"),
        "weights_live_vs_candidate": markdown_table(
            table.sort_values("change", key=abs, ascending=False).round(4), max_rows=60
        ),
    }


def initial_weights_live_check() -> dg.AssetCheckResult:
    """The gate check when the initial weights are live: nothing to compare."""
    return dg.AssetCheckResult(check_name=GATE_CHECK, passed=True, description="the initial weights are live")


def live_against_initial_check(
    evidence: Evidence, live_version: int, initial_version: int
) -> dg.AssetCheckResult:
    """Warns when the live weights predict the held-out answers worse than the initial ones: the
    upper confidence bound of their improvement (`evidence`: initial as live, live as candidate) is
    below zero."""
    upper = 2 * evidence.improvement - evidence.lower_bound
    passed = bool(evidence.held_out_offers == 0 or not upper < 0)
    return dg.AssetCheckResult(
        check_name=GATE_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"live v{live_version} against initial v{initial_version} on {evidence.held_out_offers} held-out "
            f"offers: log-loss {evidence.live_log_loss:.4f} initial, {evidence.candidate_log_loss:.4f} live"
        ),
        metadata={
            "improvement": dg.MetadataValue.float(round(evidence.improvement, 5)),
            "upper_bound": dg.MetadataValue.float(round(float(upper), 5)),
            "held_out_offers": dg.MetadataValue.int(evidence.held_out_offers),
        },
    )


def _verdict(candidate: Candidate) -> str:
    return "accepted" if candidate.accepted else "rejected"


def _evidence_rows(candidate: Candidate | None) -> pd.DataFrame:
    if candidate is None:
        return pd.DataFrame(columns=["measure", "value"])
    return pd.DataFrame(
        {
            "measure": list(candidate.evidence),
            "value": [round(v, 4) if isinstance(v, float) else v for v in candidate.evidence.values()],
        }
    )
