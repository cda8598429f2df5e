"""The metadata and check results persona_vectors and persona_index show in the UI."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.metadata import markdown_table
from persona_pipeline.personas.index_verification import CollectionProblem
from persona_pipeline.personas.weights import WeightsVersion

ONE_POINT_CHECK = "one_point_per_device"
VECTOR_COUNT_CHECK = "one_vector_per_counted_device"


def vector_count_check(stored: int, counted: int) -> dg.AssetCheckResult:
    """Warns when the vectors stored are not as many as the devices the run counts."""
    return dg.AssetCheckResult(
        check_name=VECTOR_COUNT_CHECK,
        passed=stored == counted,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"vectors_stored": stored, "devices_counted": counted},
    )


def vectors_metadata(
    *,
    devices: int,
    computed: int,
    nonzero_share: np.ndarray,
    every_device: bool,
    rewritten: int,
    removed: int,
    schema: FeatureSchema,
    space: str,
    weights: WeightsVersion,
    as_of: pd.Timestamp,
    changed: dict[str, set[str]],
    dimensions: pd.DataFrame,
    configured_recorded: bool,
) -> dict[str, dg.MetadataValue]:
    """A vectors run: the devices stored, computed, rewritten and removed, the feature space, and
    each dimension's weight with its share of non-zero values among the computed devices."""
    which = "every device" if every_device else "the devices whose vector may have changed"
    return {
        "devices": dg.MetadataValue.int(devices),
        "devices_computed": dg.MetadataValue.int(computed),
        "computed": dg.MetadataValue.text(which),
        "devices_rewritten": dg.MetadataValue.int(rewritten),
        "devices_removed": dg.MetadataValue.int(removed),
        "dimensions": dg.MetadataValue.int(len(schema.dimensions)),
        "feature_space": dg.MetadataValue.text(space),
        "schema_version": dg.MetadataValue.text(schema.version),
        "weights_version": dg.MetadataValue.int(weights.version),
        "weights_source": dg.MetadataValue.text(weights.source),
        "configured_weights": dg.MetadataValue.text(
            "recorded"
            if configured_recorded
            else f"edited, not recorded yet: v{weights.version} in use until key_weights records them"
        ),
        "as_of": dg.MetadataValue.text(as_of.isoformat()),
        "moved_recently": dg.MetadataValue.int(sum(len(v) for v in changed.values())),
        # Over the devices computed in this run.
        "dimension_weights": markdown_table(
            dimensions.assign(share_nonzero=np.round(nonzero_share, 3))[["name", "weight", "share_nonzero"]],
            max_rows=len(dimensions),
        ),
    }


def no_vectors_result() -> dg.MaterializeResult:
    """What the index reports when there are no vectors: nothing written, nothing to check."""
    return dg.MaterializeResult(
        metadata={"points_written": dg.MetadataValue.int(0)},
        check_results=[
            dg.AssetCheckResult(
                check_name=ONE_POINT_CHECK,
                passed=True,
                severity=dg.AssetCheckSeverity.ERROR,
                description="no devices",
            )
        ],
    )


def index_metadata(
    *,
    collection: str,
    alias: str,
    previous: str | None,
    location: str,
    written: int,
    deleted: int,
    points: int,
    dimensions: int,
    weights_version: int | None,
    dropped: list[str],
    verified: int,
    repairs: list[str],
) -> dict[str, dg.MetadataValue]:
    """An index run: the collection behind the alias, the points written, deleted and verified,
    the collections dropped and the repairs made."""
    return {
        "collection": dg.MetadataValue.text(collection),
        "alias": dg.MetadataValue.text(alias),
        "previous_collection": dg.MetadataValue.text(previous or "none"),
        "location": dg.MetadataValue.text(location),
        "points_written": dg.MetadataValue.int(written),
        "points_deleted": dg.MetadataValue.int(deleted),
        "points": dg.MetadataValue.int(points),
        "dimensions": dg.MetadataValue.int(dimensions),
        "weights_version": dg.MetadataValue.int(int(weights_version or 0)),
        "collections_dropped": dg.MetadataValue.text(", ".join(dropped) or "none"),
        "points_verified": dg.MetadataValue.int(verified),
        "repaired": dg.MetadataValue.text("; ".join(repairs) or "no"),
    }


def one_point_check(
    points: int, devices: int, problem: CollectionProblem | None, repairs: list[str]
) -> dg.AssetCheckResult:
    """Fails when the alias's collection does not hold one point per device or is still damaged
    after the repairs."""
    passed = points == devices and problem is None
    return dg.AssetCheckResult(
        check_name=ONE_POINT_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"points": points, "devices": devices, "repaired": "; ".join(repairs) or "no"},
        description=None
        if passed
        else (problem.description if problem else f"{points} points for {devices} devices"),
    )
