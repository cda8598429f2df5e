"""Anomalies: a score, a flag and a reason per device, from its segment and a PyOD detector."""

from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from persona_pipeline.anomalies import reporting, storage
from persona_pipeline.anomalies.reasons import explain_with_causes
from persona_pipeline.anomalies.reporting import RATE_CHECK
from persona_pipeline.anomalies.scoring import AnomalySettings, score_anomalies
from persona_pipeline.automation import AFTER_UPSTREAM
from persona_pipeline.metadata import OWNERS, table_metadata
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.resources import PersonaConfig, PersonaStore
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.segments import storage as segment_storage
from persona_pipeline.segments.assets import device_clusters, require_current_space
from persona_pipeline.segments.key_stats import (
    READABLE_COLUMNS,
    dimension_groups,
    readable_values,
    segment_stats,
)
from persona_pipeline.segments.stable_ids import UNKNOWN
from persona_pipeline.store import tables as store_tables


class AnomalyScoresConfig(dg.Config):
    detector: Literal["hbos", "ecod", "copod", "iforest", "knn"] = Field(
        default="hbos",
        description="PyOD detector of the second signal. hbos (default) measured best combined with the "
        "segment signal on the demo fleet and on public data (see README); knn is slow on large fleets.",
    )
    fdr: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="False-discovery rate of the flags (Benjamini-Hochberg over the fleet's calibrated "
        "p-values): the expected share of false alarms among flagged devices is at most this, and a fleet "
        "where nothing deviates beyond its normal spread gets no flag with probability >= 1 - fdr.",
    )
    reference_quantile: float = Field(
        default=0.9,
        gt=0.5,
        lt=1,
        description="The p-values' reference: the fleet's evidence up to this quantile; beyond it an "
        "exponential tail fitted between the median and this quantile. Holds while fewer than "
        "1 - reference_quantile of the devices deviate in one role.",
    )
    contamination: float | None = Field(
        default=None,
        gt=0,
        lt=0.5,
        description="Optional: flag exactly this share of the fleet (smallest p-values) instead of the "
        "false-discovery rate.",
    )
    segment_margin: float = Field(
        default=5.0,
        ge=0,
        description="Robust z of the distance from the segment that is still normal; only the excess "
        "adds to the detector's z.",
    )
    large_coverage: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Segments that together hold this share of devices are norms of their own; devices "
        "in the smaller ones are compared with the nearest large segment.",
    )
    detector_sample_size: int = Field(
        default=200_000, ge=1_000, description="Devices the detector is fitted on; it then scores all."
    )
    reason_keys: int = Field(default=3, ge=1, le=10, description="Keys named in each reason.")
    explained_top: int = Field(
        default=100,
        ge=0,
        description="Besides flagged devices, the highest-scored devices that also get a reason.",
    )
    expected_rate_min: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Lower end of the expected anomaly rate (check warns below); 0 by default, as a fleet "
        "where nothing is broken has no flag.",
    )
    expected_rate_max: float = Field(
        default=0.05, ge=0, le=1, description="Upper end of the expected anomaly rate (check warns above)."
    )
    random_seed: int = Field(default=0, description="Seed of the detector and its sample.")

    def settings(self) -> AnomalySettings:
        return AnomalySettings(
            detector=self.detector,
            fdr=self.fdr,
            reference_quantile=self.reference_quantile,
            segment_margin=self.segment_margin,
            contamination=self.contamination,
            large_coverage=self.large_coverage,
            detector_sample_size=self.detector_sample_size,
            random_seed=self.random_seed,
        )


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(store_tables.anomaly_scores),
    deps=[device_clusters],
    automation_condition=AFTER_UPSTREAM,
    group_name="segments",
    kinds={"pyod", "sql"},
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            RATE_CHECK,
            asset="anomaly_scores",
            description="The share of devices flagged stays inside the configured band "
            "(expected_rate_min .. expected_rate_max); warns otherwise.",
        )
    ],
)
def anomaly_scores(
    context: dg.AssetExecutionContext,
    config: AnomalyScoresConfig,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
) -> dg.MaterializeResult:
    """Per device: a calibrated `p_value`, `is_anomaly` by the Benjamini-Hochberg procedure at `fdr`,
    the flag's `kind` (the role of the keys that drove it: health, behaviour or context), `score` in
    [0, 1] (0.5 at the fleet's cut-off) and a `reason` naming the keys that deviate most, with the
    device's value against its segment's. The segment distance and a PyOD detector are kept beside
    them as `segment_z` and `detector_z` (see anomalies/scoring.py)."""
    vectors = persona_storage.read_stored_vectors(persona_store)
    schema = persona_config.feature_schema()
    if len(vectors.device_ids):
        require_current_space(vectors, schema)
    assignments = segment_storage.read_assignments(persona_store)
    segments = assignments.reindex(vectors.device_ids).fillna(UNKNOWN).to_numpy(dtype=np.int64)
    if (segments == UNKNOWN).any():
        missing = int((segments == UNKNOWN).sum())
        raise dg.Failure(
            f"{missing} devices have a vector but no segment: materialize device_clusters first",
            allow_retries=False,
        )
    if len(vectors.device_ids) == 0:
        return reporting.no_devices_result()

    settings = config.settings()
    result = score_anomalies(vectors.matrix, segments, settings, roles=schema.dimension_roles)
    values = readable_values(
        persona_storage.read_profiles(persona_store, columns=READABLE_COLUMNS),
        schema,
        vectors.device_ids,
        vectors.frame(),
    )
    stats = segment_stats(values, segments)
    strangest = np.lexsort((-result.combined_z, -result.score))
    top = strangest[: config.explained_top]
    explained = np.union1d(np.flatnonzero(result.is_anomaly), top)
    reasons = explain_with_causes(
        explained, result, dimension_groups(schema), values, stats, keys=config.reason_keys
    )

    scores = pd.DataFrame(
        {
            "device_id": vectors.device_ids,
            "score": result.score,
            "is_anomaly": result.is_anomaly,
            "reason": reasons["reason"].reindex(np.arange(len(vectors.device_ids))).to_numpy(),
            "cause": reasons["cause"].reindex(np.arange(len(vectors.device_ids))).to_numpy(),
            "cluster_id": result.deviation.reference,
            "segment_z": result.segment_z,
            "detector": settings.detector,
            "detector_z": result.detector_z,
            "scored_at": pd.Timestamp.now(tz="UTC"),
            "kind": result.kind,
            "p_value": result.p_value,
        }
    )
    storage.write_scores(persona_store, scores)

    rate = float(result.is_anomaly.mean())
    context.log.info(f"{int(result.is_anomaly.sum())} anomalies of {len(scores)} devices ({rate:.2%})")
    return dg.MaterializeResult(
        metadata=reporting.scores_metadata(scores, result, settings, strangest),
        check_results=[reporting.rate_check(rate, config.expected_rate_min, config.expected_rate_max)],
    )
