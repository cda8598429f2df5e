"""The metadata and check results anomaly_scores shows in the UI."""

from __future__ import annotations

import itertools

import dagster as dg
import numpy as np
import pandas as pd

from persona_pipeline.anomalies.scoring import AnomalySettings
from persona_pipeline.metadata import markdown_table

RATE_CHECK = "anomaly_rate_within_band"
TOP_SHOWN = 10
TOP_COLUMNS = ["device_id", "score", "p_value", "is_anomaly", "kind", "cluster_id", "reason"]


def no_devices_result() -> dg.MaterializeResult:
    """What a run with no vectors reports: no devices, and a check with nothing to judge."""
    return dg.MaterializeResult(
        metadata={"devices": dg.MetadataValue.int(0)},
        check_results=[dg.AssetCheckResult(check_name=RATE_CHECK, passed=True, description="no devices")],
    )


def scores_metadata(
    scores: pd.DataFrame, settings: AnomalySettings, strangest: np.ndarray
) -> dict[str, dg.MetadataValue]:
    """Counts, how devices were flagged, the score distribution, the strangest devices (`strangest`:
    row positions, strangest first) and the flags per segment."""
    ranked = scores.iloc[strangest[:TOP_SHOWN]]
    flagged = scores["is_anomaly"].to_numpy(dtype=bool)
    kinds = scores.loc[flagged, "kind"].value_counts()
    return {
        "devices": dg.MetadataValue.int(len(scores)),
        "anomalies": dg.MetadataValue.int(int(flagged.sum())),
        "anomaly_rate": dg.MetadataValue.float(round(float(flagged.mean()), 5)),
        "detector": dg.MetadataValue.text(settings.detector),
        "flagged_by": dg.MetadataValue.text(
            f"the {settings.contamination:.2%} of devices with the smallest p-values"
            if settings.contamination
            else f"Benjamini-Hochberg at a false-discovery rate of {settings.fdr:.1%} "
            f"(p-value <= {_largest_flagged_p(scores['p_value'].to_numpy()[flagged])}; score >= 0.5)"
        ),
        "anomalies_by_kind": dg.MetadataValue.json({str(k): int(v) for k, v in kinds.items()}),
        "score_distribution": markdown_table(_distribution(scores["score"].to_numpy()), max_rows=20),
        "top_anomalies": markdown_table(
            ranked[TOP_COLUMNS].assign(
                score=ranked["score"].round(3), p_value=ranked["p_value"].map(lambda p: f"{p:.1e}")
            ),
            max_rows=TOP_SHOWN,
            max_cell_chars=400,
        ),
        "anomalies_per_segment": markdown_table(
            scores.groupby("cluster_id")
            .agg(devices=("device_id", "size"), anomalies=("is_anomaly", "sum"))
            .reset_index(),
            max_rows=50,
        ),
    }


def mode_metadata(
    reason: str, devices_scored: int, norms_devices: int, fitted_at: pd.Timestamp, norms_kept: bool
) -> dict[str, dg.MetadataValue]:
    """How a run that scored every device came to, and the norms it fitted (on how many devices,
    and whether they were kept for the runs between fits)."""
    return {
        "scoring": dg.MetadataValue.text(f"every device: {reason}"),
        "devices_scored": dg.MetadataValue.int(devices_scored),
        "norms_fitted_on": dg.MetadataValue.int(norms_devices),
        "norms_fitted_at": dg.MetadataValue.timestamp(fitted_at.to_pydatetime()),
        "norms_kept": dg.MetadataValue.bool(norms_kept),
    }


def rescored_metadata(
    scores: pd.DataFrame,
    devices: int,
    flagged: int,
    by_kind: list[tuple[str | None, int]],
    changed: int,
    turned: int,
    left: int,
    fitted_at: pd.Timestamp,
    settings: AnomalySettings,
) -> dict[str, dg.MetadataValue]:
    """A run between fits: the fleet's counts, and what it scored against the stored norms."""
    ranked = scores.sort_values("score", ascending=False).head(TOP_SHOWN)
    return {
        "devices": dg.MetadataValue.int(devices),
        "anomalies": dg.MetadataValue.int(flagged),
        "anomaly_rate": dg.MetadataValue.float(round(flagged / devices, 5) if devices else 0.0),
        "anomalies_by_kind": dg.MetadataValue.json({str(kind): count for kind, count in by_kind}),
        "detector": dg.MetadataValue.text(settings.detector),
        "scoring": dg.MetadataValue.text(
            "the devices whose vector or segment changed, against the norms of the last full scoring"
        ),
        "devices_scored": dg.MetadataValue.int(len(scores)),
        "devices_changed": dg.MetadataValue.int(changed),
        "flags_turned": dg.MetadataValue.int(turned),
        "devices_left": dg.MetadataValue.int(left),
        "norms_fitted_at": dg.MetadataValue.timestamp(fitted_at.to_pydatetime()),
        "top_scored_now": markdown_table(
            ranked[TOP_COLUMNS].assign(
                score=ranked["score"].round(3), p_value=ranked["p_value"].map(lambda p: f"{p:.1e}")
            ),
            max_rows=TOP_SHOWN,
            max_cell_chars=400,
        ),
    }


def rate_check(rate: float, rate_min: float, rate_max: float) -> dg.AssetCheckResult:
    """Warns when the share of devices flagged is outside `rate_min` .. `rate_max`."""
    in_band = rate_min <= rate <= rate_max
    band = f"{rate_min:.2%} .. {rate_max:.2%}"
    return dg.AssetCheckResult(
        check_name=RATE_CHECK,
        passed=in_band,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"anomaly_rate": round(rate, 5), "band": band},
        description=None if in_band else f"anomaly rate {rate:.2%} is outside {band}",
    )


def _largest_flagged_p(flagged_p_values: np.ndarray) -> str:
    return f"{flagged_p_values.max():.1e}" if len(flagged_p_values) else "none flagged"


def _distribution(score: np.ndarray) -> pd.DataFrame:
    edges = np.array([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    counts, _ = np.histogram(score, bins=edges)
    quantiles = np.quantile(score, [0.5, 0.9, 0.99, 1.0])
    frame = pd.DataFrame(
        {
            "score": [f"{low:.1f}–{high:.1f}" for low, high in itertools.pairwise(edges)],
            "devices": counts,
        }
    )
    summary = pd.DataFrame(
        {"score": ["median", "p90", "p99", "max"], "devices": [f"{q:.3f}" for q in quantiles]}
    )
    return pd.concat([frame, summary], ignore_index=True)
