"""The metadata and check results segments and device_clusters show in the UI."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from persona_pipeline.metadata import markdown_table, rounded
from persona_pipeline.segments.clustering import NOISE, SegmentFit
from persona_pipeline.segments.stable_ids import UNKNOWN, Matching

STABILITY_CHECK = "segments_stable"
ASSIGNED_CHECK = "every_device_in_a_segment"


def stability_check(
    previous: np.ndarray, current: np.ndarray, min_ari: float, schema_changed: bool
) -> dg.AssetCheckResult:
    """The adjusted Rand index of the devices that had a segment before, against `min_ari`."""
    had = previous != UNKNOWN
    if schema_changed or had.sum() < 2:
        why = "the feature schema changed" if schema_changed else "no earlier segments to compare"
        return dg.AssetCheckResult(check_name=STABILITY_CHECK, passed=True, description=f"not judged: {why}")
    ari = float(adjusted_rand_score(previous[had], current[had]))
    return dg.AssetCheckResult(
        check_name=STABILITY_CHECK,
        passed=ari >= min_ari,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"adjusted_rand_index": round(ari, 3), "devices_compared": int(had.sum())},
        description=None if ari >= min_ari else f"segments moved: adjusted Rand index {ari:.3f} < {min_ari}",
    )


def kept_fit_result(fitted_at: pd.Timestamp, segments: int) -> dg.MaterializeResult:
    """A run between fits: the last fit stands, so the stability check passes unjudged."""
    return dg.MaterializeResult(
        metadata={
            "mode": dg.MetadataValue.text("kept"),
            "segments": dg.MetadataValue.int(segments),
            "fitted_at": dg.MetadataValue.timestamp(fitted_at.timestamp()),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=STABILITY_CHECK,
                passed=True,
                description="no fit: the last fit's segments stand, and device_clusters assigns the "
                "devices whose vector changed to them",
            )
        ],
    )


def assigned_check(unassigned: int) -> dg.AssetCheckResult:
    """After a run of device_clusters, every device of its shard with a vector has a segment of
    the current fit (a vector written during the run, say, would not)."""
    return dg.AssetCheckResult(
        check_name=ASSIGNED_CHECK,
        passed=unassigned == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"devices_not_current": unassigned},
        description=None if unassigned == 0 else f"{unassigned:,} devices lack a segment of the current fit",
    )


def no_devices_result() -> dg.MaterializeResult:
    """What a fit with no vectors reports: no devices, and a check with nothing to judge."""
    return dg.MaterializeResult(
        metadata={"devices": dg.MetadataValue.int(0)},
        check_results=[
            dg.AssetCheckResult(check_name=STABILITY_CHECK, passed=True, description="no devices")
        ],
    )


def fit_metadata(
    fit: SegmentFit,
    matching: Matching,
    described: pd.DataFrame,
    cluster_ids: np.ndarray,
    previous_ids: np.ndarray,
    fleet: int,
    space: str | None,
    reason: str,
) -> dict[str, dg.MetadataValue]:
    """A full fit of `cluster_ids`' devices (the fleet's `fleet`, or a sample of it): its segments
    and their profiles, the choice of k, and how many of them and ids moved against
    `previous_ids` (aligned with `cluster_ids`, UNKNOWN where a device had none)."""
    reassigned = (previous_ids != cluster_ids) & (previous_ids != UNKNOWN)
    return {
        "devices": dg.MetadataValue.int(fleet),
        "devices_fitted": dg.MetadataValue.int(len(cluster_ids)),
        "segments": dg.MetadataValue.int(fit.n_segments),
        "algorithm": dg.MetadataValue.text(fit.algorithm),
        "choice_of_k": dg.MetadataValue.text(fit.note),
        "silhouette": rounded(fit.silhouette if fit.silhouette is not None else float("nan")),
        "segment_profiles": segment_profiles_table(described),
        "size_distribution": dg.MetadataValue.md(_size_distribution(described["devices"], len(cluster_ids))),
        "silhouette_by_k": markdown_table(
            pd.DataFrame({"k": list(fit.k_scores), "silhouette": np.round(list(fit.k_scores.values()), 4)}),
            max_rows=50,
        )
        if fit.k_scores
        else dg.MetadataValue.text("k not searched"),
        "devices_reassigned": dg.MetadataValue.int(int(reassigned.sum())),
        "devices_new": dg.MetadataValue.int(int((previous_ids == UNKNOWN).sum())),
        "noise_devices": dg.MetadataValue.int(int((cluster_ids == NOISE).sum())),
        "segments_kept": dg.MetadataValue.int(matching.matched),
        "segments_new": dg.MetadataValue.int(matching.new),
        "segments_retired": dg.MetadataValue.text(", ".join(map(str, matching.retired)) or "none"),
        "warm_started": dg.MetadataValue.bool(fit.warm_started),
        "feature_space": dg.MetadataValue.text(space or ""),
        "mode": dg.MetadataValue.text("fit"),
        "fit_reason": dg.MetadataValue.text(reason),
    }


def assign_metadata(
    counts: pd.Series,
    active_segments: pd.DataFrame,
    assigned: int,
    removed: int,
    fitted_at: pd.Timestamp | None,
    payloads_written: int,
    space: str | None,
) -> dict[str, dg.MetadataValue]:
    """Today's segment sizes over the fleet (`counts`, devices per cluster_id), the profiles of
    the last fit (`active_segments`), and what this run assigned and removed."""
    metadata = {
        "devices": dg.MetadataValue.int(int(counts.sum())),
        "segments": dg.MetadataValue.int(int((counts[counts.index != NOISE] > 0).sum())),
        "segment_profiles": segment_profiles_table(active_segments),
        "devices_assigned": dg.MetadataValue.int(assigned),
        "devices_removed": dg.MetadataValue.int(removed),
        "noise_devices": dg.MetadataValue.int(int(counts.get(NOISE, 0))),
        "size_distribution": dg.MetadataValue.md(_size_distribution(counts[counts > 0], int(counts.sum()))),
        "payloads_written": dg.MetadataValue.int(payloads_written),
        "feature_space": dg.MetadataValue.text(space or ""),
    }
    if fitted_at is not None:
        metadata["fitted_at"] = dg.MetadataValue.timestamp(fitted_at.timestamp())
    return metadata


def segment_profiles_table(described: pd.DataFrame) -> dg.MetadataValue:
    """segment, name, devices, share (of the devices in a segment) and traits, as the UI shows them."""
    share = (
        described["share"]
        if "share" in described
        else described["devices"] / max(described["devices"].sum(), 1)
    )
    share = (share * 100).round(1)
    table = described.assign(share=share)[["segment", "name", "devices", "share", "traits"]]
    return markdown_table(table.rename(columns={"share": "share %"}), max_rows=50, max_cell_chars=400)


def _size_distribution(sizes: pd.Series, devices: int) -> str:
    if sizes.empty:
        return "no segments"
    largest = int(sizes.max())
    return (
        f"{len(sizes)} segments; smallest {int(sizes.min()):,}, median {int(sizes.median()):,}, "
        f"largest {largest:,} ({largest / max(devices, 1):.0%} of devices)"
    )
