"""Anomaly scores from two signals: distance from the device's segment and a PyOD detector. Pure.

Segment signal: each device's distance to its segment's centre (the coordinate-wise
median of its members), per dimension in units of the larger of the segment's
robust spread (1.4826 x MAD) and the fleet's standard deviation; then a robust z of
that distance among the segment's members (median and MAD). Segments too small to
be a norm of their own (the fewest devices covering the last `1 - large_coverage` of
the fleet, as in CBLOF), and density noise, are measured against the nearest large
segment instead, so a small group of similar oddities does not hide in a segment
of its own.

Detector signal: a PyOD detector on robust-standardised vectors, its scores turned
into a robust z over the fleet.

Combined: the detector's z, plus the segment z beyond `segment_margin`, so a device
counts as strange when the detector finds it odd or when it lies far outside its
segment. It ranks devices for people (reasons, top anomalies); it does not flag.

Flags are calibrated evidence, per role of the keys (feature schema: health, behaviour,
context). Per role, a device's evidence is the length of its deviation over that role's
dimensions: health keys against the fleet's robust norm (median and robust spread: a fault
is a fault in any segment, and a group of failing devices may form a segment of its own),
behaviour and context keys against the device's reference segment (the segment signal's
deviations). Each evidence becomes a p-value against the fleet itself: the conformal share
of the other devices at least as strange, and beyond the fleet's `reference_quantile` an
exponential tail fitted between the median and that quantile (so the fleet's top 10 %
never calibrate themselves). A device's p-value is the smallest over the roles times the
number of roles (Bonferroni); the Benjamini-Hochberg procedure at `fdr` flags the fleet, so
the expected share of false alarms among flags is at most `fdr`, and on a fleet where
nothing deviates beyond its normal spread no device is flagged with probability >= 1 - fdr.
`kind` is the role whose evidence is strongest (its p-value smallest). `score` maps
-log10(p) to [0, 1], 0.5 at the fleet's cut-off: flagged exactly when score >= 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Literal

import numpy as np
from scipy.stats import binom

from persona_pipeline.segments.clustering import NOISE

Detector = Literal["hbos", "ecod", "copod", "iforest", "knn"]
DETECTORS: tuple[Detector, ...] = ("hbos", "ecod", "copod", "iforest", "knn")
HALF_SCORE_Z = 3.5
MAD_TO_SD = 1.4826
ROLE_ORDER = ("health", "behaviour", "context")  # ties of evidence go to the first
# Spreads of a dimension whose MAD is 0 (binary, one-hot, rare counts): the first non-zero of the
# interdecile and the 1st-99th percentile range in standard-deviation units, else the standard
# deviation; a dimension that never varies keeps deviation 0.
SPREAD_FALLBACKS = ((10.0, 90.0, 2.5631), (1.0, 99.0, 4.6527))
# A value more than this share of the fleet holds enters the last fallback's percentile range at
# the next fit and becomes part of the fleet's normal spread; a rarer one stays strange.
COMMON_SHARE = 1 - SPREAD_FALLBACKS[-1][1] / 100
MIN_EXTRAPOLATED = 20  # devices a fleet needs before its tail is extrapolated beyond its own ranks
REFERENCE_POINTS = 10_001  # a role's evidence kept with the norms: every device's, or this many quantiles


@dataclass(frozen=True)
class AnomalySettings:
    detector: Detector = "hbos"
    fdr: float = 0.05
    reference_quantile: float = 0.9
    segment_margin: float = 5.0
    contamination: float | None = None
    large_coverage: float = 0.9
    large_ratio: float = 5.0
    detector_sample_size: int = 200_000
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {self.detector!r}")
        if self.contamination is not None and not 0 < self.contamination < 0.5:
            raise ValueError(f"contamination must be in (0, 0.5); got {self.contamination}")
        if not 0 < self.fdr < 1:
            raise ValueError(f"fdr must be in (0, 1); got {self.fdr}")
        if not 0.5 < self.reference_quantile < 1:
            raise ValueError(f"reference_quantile must be in (0.5, 1); got {self.reference_quantile}")
        if not 0 < self.large_coverage <= 1:
            raise ValueError(f"large_coverage must be in (0, 1]; got {self.large_coverage}")


@dataclass
class SegmentDeviation:
    reference: np.ndarray  # the segment each device was compared with
    deviations: np.ndarray  # devices x dimensions, in units of the reference's spread
    distance_z: np.ndarray  # robust z of the scaled distance within the reference segment
    large_segments: np.ndarray


@dataclass
class AnomalyResult:
    score: np.ndarray
    is_anomaly: np.ndarray
    p_value: np.ndarray  # calibrated, Bonferroni over the roles
    kind: np.ndarray  # the role that drove a flag; None when not flagged
    role_log_p: dict[str, np.ndarray]  # natural log of each role's p-value
    combined_z: np.ndarray
    segment_z: np.ndarray
    detector_z: np.ndarray
    deviation: SegmentDeviation
    settings: AnomalySettings


@dataclass
class SegmentNorms:
    """The large segments' centres, per-dimension scales and the spread (median, MAD scale) of
    their members' scaled distance; `large` is [NOISE] when the fleet was the only norm."""

    large: np.ndarray
    centres: np.ndarray
    scales: np.ndarray
    spread: np.ndarray


@dataclass
class DetectorNorms:
    """The fitted detector, the robust standardisation it was fitted in, and the median and
    spread of the fleet's detector scores (its z)."""

    name: Detector
    centre: np.ndarray
    scale: np.ndarray
    detector: object | None  # None for a fleet too small to fit one: every z is 0
    score_centre: float
    score_spread: float

    @classmethod
    def none(cls, name: Detector, dimensions: int) -> DetectorNorms:
        return cls(name, np.zeros(dimensions), np.ones(dimensions), None, 0.0, 0.0)

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        if self.detector is None:
            return np.zeros(len(matrix))
        if self.name == "hbos":  # a detector loaded from the store: its scoring loop compiled once
            from pyod.models import hbos

            _cache_hbos_compilation(hbos)
        return _decision_function(self.detector, (matrix - self.centre) / self.scale)

    def z(self, scores: np.ndarray) -> np.ndarray:
        if self.score_spread <= 0:
            return np.zeros(len(scores))
        return (np.asarray(scores, dtype=np.float64) - self.score_centre) / self.score_spread


@dataclass
class EvidenceReference:
    """A role's evidence over the fleet the norms were fitted on: every device's, sorted, or for
    a larger fleet REFERENCE_POINTS quantiles of it and its REFERENCE_POINTS largest values (the
    ranks of the strangest devices stay exact); with the reference quantile and the tail's decay."""

    sorted_evidence: np.ndarray
    largest: np.ndarray  # sorted; empty when `sorted_evidence` holds every device
    devices: int
    high: float
    tail_share: float
    decay: float | None  # None: too few devices or no spread, no tail beyond the ranks

    @classmethod
    def of(cls, evidence: np.ndarray, reference_quantile: float) -> EvidenceReference:
        n = len(evidence)
        if n <= REFERENCE_POINTS:
            kept, largest = np.sort(evidence), np.zeros(0)
        else:
            kept = np.quantile(evidence, np.linspace(0, 1, REFERENCE_POINTS))
            largest = np.sort(np.partition(evidence, n - REFERENCE_POINTS)[n - REFERENCE_POINTS :])
        median, high = np.quantile(evidence, [0.5, reference_quantile]) if n else (0.0, 0.0)
        tail_share = 1 - reference_quantile
        extrapolated = n >= MIN_EXTRAPOLATED and high - median > 1e-12
        decay = float((high - median) / np.log(0.5 / tail_share)) if extrapolated else None
        return cls(kept, largest, n, float(high), tail_share, decay)

    def log_p(self, evidence: np.ndarray) -> np.ndarray:
        """Natural log of each value's p-value among the reference fleet, counting the device
        once (conformal: (devices at least as strange + 1) / (n + 1)), and beyond the reference
        quantile the smaller of that and the tail."""
        evidence = np.asarray(evidence, dtype=np.float64)
        kept = len(self.sorted_evidence)
        if kept == 0:
            return np.zeros(len(evidence))
        at_least = (kept - np.searchsorted(self.sorted_evidence, evidence, side="left")) / kept * self.devices
        if len(self.largest):
            among_largest = evidence >= self.largest[0]
            at_least[among_largest] = len(self.largest) - np.searchsorted(
                self.largest, evidence[among_largest], side="left"
            )
        log_p = np.log((at_least + 1) / (self.devices + 1))
        if self.decay is not None:
            tail = evidence > self.high
            log_p[tail] = np.minimum(
                log_p[tail], np.log(self.tail_share) - (evidence[tail] - self.high) / self.decay
            )
        return log_p


@dataclass
class AnomalyNorms:
    """What a fleet's scoring fits, kept so devices that change later are scored against the
    same norms without the fleet: see `fit_norms` and `score_with_norms`."""

    settings: AnomalySettings
    roles: np.ndarray
    segments: SegmentNorms
    detector: DetectorNorms
    health_centre: np.ndarray | None
    health_spread: np.ndarray | None
    references: dict[str, EvidenceReference]


@dataclass
class DeviceEvidence:
    """Devices' evidence before the fleet is flagged: the Bonferroni p-value over the roles,
    the role behind it, and the two ranking signals."""

    log_p: np.ndarray
    strongest: np.ndarray
    role_log_p: dict[str, np.ndarray]
    combined_z: np.ndarray
    detector_z: np.ndarray
    deviation: SegmentDeviation

    @classmethod
    def of(
        cls,
        role_log_p: dict[str, np.ndarray],
        deviation: SegmentDeviation,
        detector_z: np.ndarray,
        segment_margin: float,
    ) -> DeviceEvidence:
        devices = len(deviation.distance_z)
        if role_log_p:
            stacked = np.vstack(list(role_log_p.values()))
            log_p = np.minimum(stacked.min(axis=0) + np.log(len(role_log_p)), 0.0)
            strongest = np.array(list(role_log_p), dtype=object)[stacked.argmin(axis=0)]
        else:  # no dimensions
            log_p, strongest = np.zeros(devices), np.full(devices, None, dtype=object)
        combined = combine(deviation.distance_z, detector_z, segment_margin)
        return cls(log_p, strongest, role_log_p, combined, detector_z, deviation)

    @staticmethod
    def joined(parts: list[DeviceEvidence]) -> DeviceEvidence:
        """One DeviceEvidence of all `parts`, in their order."""
        first = parts[0]
        return DeviceEvidence(
            log_p=np.concatenate([part.log_p for part in parts]),
            strongest=np.concatenate([part.strongest for part in parts]),
            role_log_p={
                role: np.concatenate([part.role_log_p[role] for part in parts]) for role in first.role_log_p
            },
            combined_z=np.concatenate([part.combined_z for part in parts]),
            detector_z=np.concatenate([part.detector_z for part in parts]),
            deviation=SegmentDeviation(
                reference=np.concatenate([part.deviation.reference for part in parts]),
                deviations=np.concatenate([part.deviation.deviations for part in parts]),
                distance_z=np.concatenate([part.deviation.distance_z for part in parts]),
                large_segments=first.deviation.large_segments,
            ),
        )

    def without_deviations(self) -> DeviceEvidence:
        """The same evidence without the per-dimension deviations (devices x 0): what a fleet
        scored a page at a time keeps of each page."""
        kept = replace(self.deviation, deviations=np.zeros((len(self.log_p), 0), dtype=np.float32))
        return replace(self, deviation=kept)

    def result(self, is_anomaly: np.ndarray, cut: float, settings: AnomalySettings) -> AnomalyResult:
        """The devices' result, once the fleet's flags and their cut (log p) are known."""
        return AnomalyResult(
            score=score_from_log_p(self.log_p, cut),
            is_anomaly=is_anomaly,
            p_value=np.exp(self.log_p),
            kind=np.where(is_anomaly, self.strongest, None),
            role_log_p=self.role_log_p,
            combined_z=self.combined_z,
            segment_z=self.deviation.distance_z,
            detector_z=self.detector_z,
            deviation=self.deviation,
            settings=settings,
        )


def score_anomalies(
    matrix: np.ndarray,
    segments: np.ndarray,
    settings: AnomalySettings,
    roles: np.ndarray | None = None,
) -> AnomalyResult:
    """`roles`: the role of each dimension (feature schema); all `context` when not given."""
    return fit_norms(matrix, segments, settings, roles)[1]


def fit_norms(
    matrix: np.ndarray,
    segments: np.ndarray,
    settings: AnomalySettings,
    roles: np.ndarray | None = None,
) -> tuple[AnomalyNorms, AnomalyResult]:
    """The fleet's norms (what `score_with_norms` compares other devices with later) and the
    fleet's own scores against them, each device's p-value among the fleet it belongs to."""
    matrix = np.asarray(matrix, dtype=np.float64)
    roles = np.full(matrix.shape[1], "context", dtype=object) if roles is None else np.asarray(roles)
    segment_norms = fit_segment_norms(matrix, segments, settings.large_coverage, settings.large_ratio)
    deviation = apply_segment_norms(segment_norms, matrix, segments)
    detector, raw_scores = fit_detector(matrix, settings)
    detector_z = detector.z(raw_scores)
    health = matrix[:, roles == "health"]
    health_centre = np.median(health, axis=0) if health.shape[1] else None
    health_spread = robust_spread(health) if health.shape[1] else None
    evidence = role_evidence(matrix, deviation, roles, health_centre, health_spread)
    quantile = settings.reference_quantile
    role_log_p = {role: log_p_values(values, quantile) for role, values in evidence.items()}
    norms = AnomalyNorms(
        settings=settings,
        roles=roles,
        segments=segment_norms,
        detector=detector,
        health_centre=health_centre,
        health_spread=health_spread,
        references={role: EvidenceReference.of(values, quantile) for role, values in evidence.items()},
    )
    scored = DeviceEvidence.of(role_log_p, deviation, detector_z, settings.segment_margin)
    is_anomaly, cut = calibrated_flags(scored.log_p, settings.fdr, settings.contamination)
    return norms, scored.result(is_anomaly, cut, settings)


def score_with_norms(norms: AnomalyNorms, matrix: np.ndarray, segments: np.ndarray) -> DeviceEvidence:
    """Devices scored against norms fitted earlier: each p-value is the device's place among the
    fleet the norms were fitted on (conformal, the device counted once) and that fleet's tail."""
    matrix = np.asarray(matrix, dtype=np.float64)
    settings = norms.settings
    deviation = apply_segment_norms(norms.segments, matrix, segments)
    detector_z = norms.detector.z(norms.detector.scores(matrix))
    evidence = role_evidence(matrix, deviation, norms.roles, norms.health_centre, norms.health_spread)
    role_log_p = {role: norms.references[role].log_p(values) for role, values in evidence.items()}
    return DeviceEvidence.of(role_log_p, deviation, detector_z, settings.segment_margin)


@dataclass(frozen=True)
class Drift:
    """How the devices scored against stored norms compare with the fleet the norms were fitted
    on: how many have a p-value at most `share`, how many such a fleet would have, and the chance
    of at least that many if they were like it (binomial tail)."""

    devices: int
    strange: int
    expected: float
    chance: float


def drift(log_p: np.ndarray, share: float = 0.01) -> Drift:
    """Devices like the reference fleet have p-values at most `share` for about `share` of them
    (Bonferroni over the roles makes that fewer); many more say the fleet moved since the fit:
    a new behaviour that many share, which the fleet itself would call normal."""
    devices = len(log_p)
    strange = int((np.asarray(log_p) <= np.log(share)).sum())
    chance = float(binom.sf(strange - 1, devices, share)) if devices else 1.0
    return Drift(devices, strange, share * devices, chance)


def robust_spread(matrix: np.ndarray) -> np.ndarray:
    """Per column: 1.4826 MAD, or the SPREAD_FALLBACKS where that is 0 (never 0 itself)."""
    centre = np.median(matrix, axis=0)
    spread = MAD_TO_SD * np.median(np.abs(matrix - centre), axis=0)
    for low, high, in_sd in SPREAD_FALLBACKS:
        if (spread > 1e-12).all():
            break
        low_q, high_q = np.percentile(matrix, [low, high], axis=0)
        spread = np.where(spread > 1e-12, spread, (high_q - low_q) / in_sd)
    return np.where(spread > 1e-12, spread, np.maximum(matrix.std(axis=0), 1e-9))


def role_evidence(
    matrix: np.ndarray,
    deviation: SegmentDeviation,
    roles: np.ndarray,
    health_centre: np.ndarray | None,
    health_spread: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Per role present: each device's deviation length over that role's dimensions (health
    against the fleet's centre and spread, the others against the reference segment)."""
    evidence = {}
    for role in [*ROLE_ORDER, *sorted(set(roles) - set(ROLE_ORDER))]:
        columns = np.flatnonzero(roles == role)
        if len(columns) == 0:
            continue
        if role == "health":
            scaled = (matrix[:, columns] - health_centre) / health_spread
        else:
            scaled = deviation.deviations[:, columns].astype(np.float64)
        evidence[role] = np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
    return evidence


def log_p_values(evidence: np.ndarray, reference_quantile: float = 0.9) -> np.ndarray:
    """Natural log of a p-value per device: the share of the fleet at least as strange (the
    device counts itself once: conformal with n - 1 others), and beyond the fleet's
    `reference_quantile` the smaller of that and an exponential tail fitted between the median
    and that quantile."""
    n = len(evidence)
    if n == 0:
        return np.zeros(0)
    at_least = n - np.searchsorted(np.sort(evidence), evidence, side="left")
    log_p = np.log(at_least / n)
    if n < MIN_EXTRAPOLATED:
        return log_p
    median, high = np.quantile(evidence, [0.5, reference_quantile])
    if high - median <= 1e-12:  # no spread to extrapolate from
        return log_p
    tail_share = 1 - reference_quantile
    decay = (high - median) / np.log(0.5 / tail_share)
    tail = evidence > high
    log_p[tail] = np.minimum(log_p[tail], np.log(tail_share) - (evidence[tail] - high) / decay)
    return log_p


def calibrated_flags(log_p: np.ndarray, fdr: float, contamination: float | None) -> tuple[np.ndarray, float]:
    """Benjamini-Hochberg at `fdr` (or the `contamination` share with the smallest p-values) and
    the log p-value at the cut (the largest flagged, or log(fdr / n) when none is)."""
    n = len(log_p)
    flagged = np.zeros(n, dtype=bool)
    if n == 0:
        return flagged, 0.0
    order = np.argsort(log_p, kind="stable")
    if contamination is not None:
        count = int(np.ceil(contamination * n))
    else:
        passes = log_p[order] <= np.log(np.arange(1, n + 1) * fdr / n)
        count = int(np.flatnonzero(passes)[-1]) + 1 if passes.any() else 0
    flagged[order[:count]] = True
    cut = float(log_p[order[count - 1]]) if count else float(np.log(fdr / n))
    return flagged, cut


def score_from_log_p(log_p: np.ndarray, cut: float) -> np.ndarray:
    """-log p mapped to [0, 1]: 0.5 at the cut, so score >= 0.5 exactly when flagged."""
    strength = -np.asarray(log_p, dtype=np.float64)
    half = max(-cut, 1e-12)
    return strength / (strength + half)


def combine(segment_z: np.ndarray, detector_z: np.ndarray, segment_margin: float) -> np.ndarray:
    return detector_z + np.maximum(segment_z - segment_margin, 0.0)


def score_from_z(z: np.ndarray) -> np.ndarray:
    positive = np.maximum(z, 0.0)
    return positive / (positive + HALF_SCORE_Z)


def flag(combined: np.ndarray, threshold: float, contamination: float | None) -> np.ndarray:
    if contamination is None or len(combined) == 0:
        return combined >= threshold
    count = int(np.ceil(contamination * len(combined)))
    flagged = np.zeros(len(combined), dtype=bool)
    flagged[np.argsort(-combined, kind="stable")[:count]] = True
    return flagged


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); the standard deviation when the MAD is 0."""
    values = np.asarray(values, dtype=np.float64)
    centre, spread = robust_location(values)
    return (values - centre) / spread if spread > 0 else np.zeros_like(values)


def robust_location(values: np.ndarray) -> tuple[float, float]:
    """The median and 1.4826 MAD of `values` (the standard deviation when the MAD is 0; 0 when
    that is too)."""
    if len(values) == 0:
        return 0.0, 0.0
    centre = float(np.median(values))
    spread = MAD_TO_SD * float(np.median(np.abs(values - centre)))
    if spread <= 1e-12:
        spread = float(values.std())
    return centre, spread if spread > 1e-12 else 0.0


def robust_standardisation(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the median, and the 1.4826 MAD (else the standard deviation, else 1)."""
    centre = np.median(matrix, axis=0)
    spread = MAD_TO_SD * np.median(np.abs(matrix - centre), axis=0)
    fallback = matrix.std(axis=0)
    return centre, np.where(spread > 1e-12, spread, np.where(fallback > 1e-12, fallback, 1.0))


def large_segments(segments: np.ndarray, coverage: float, ratio: float) -> np.ndarray:
    """Segments that together hold `coverage` of the devices, or up to a size drop of `ratio`."""
    ids, sizes = np.unique(segments[segments != NOISE], return_counts=True)
    if len(ids) == 0:
        return ids
    order = np.lexsort((ids, -sizes))
    ids, sizes = ids[order], sizes[order]
    covered = np.cumsum(sizes) / sizes.sum()
    drop = np.append(sizes[:-1] / sizes[1:] >= ratio, False)
    last = (
        int(np.argmax((covered >= coverage) | drop)) if ((covered >= coverage) | drop).any() else len(ids) - 1
    )
    return np.sort(ids[: last + 1])


def segment_deviation(
    matrix: np.ndarray, segments: np.ndarray, coverage: float = 0.9, ratio: float = 5.0
) -> SegmentDeviation:
    return apply_segment_norms(fit_segment_norms(matrix, segments, coverage, ratio), matrix, segments)


def fit_segment_norms(
    matrix: np.ndarray, segments: np.ndarray, coverage: float = 0.9, ratio: float = 5.0
) -> SegmentNorms:
    large = large_segments(segments, coverage, ratio)
    dims = matrix.shape[1]
    if len(large) == 0:  # every device is density noise: the fleet is the only norm
        segments = np.full(len(matrix), NOISE, dtype=np.int64)
        large = np.array([NOISE])
    fleet_sd = matrix.std(axis=0)
    centres = np.empty((len(large), dims))
    scales = np.empty((len(large), dims))
    spread = np.empty((len(large), 2))  # median and MAD-scale of the members' scaled distance
    for i, segment in enumerate(large):
        members = matrix[segments == segment]
        centres[i] = np.median(members, axis=0)
        mad = MAD_TO_SD * np.median(np.abs(members - centres[i]), axis=0)
        scales[i] = np.maximum(np.maximum(mad, fleet_sd), 1e-9)
        distance = np.linalg.norm((members - centres[i]) / scales[i], axis=1)
        spread[i] = _median_and_spread(distance)
    return SegmentNorms(large=large, centres=centres, scales=scales, spread=spread)


def apply_segment_norms(norms: SegmentNorms, matrix: np.ndarray, segments: np.ndarray) -> SegmentDeviation:
    """Each device against its segment when that is a large one, else against the nearest large one."""
    large, centres, scales, spread = norms.large, norms.centres, norms.scales, norms.spread
    n = len(matrix)
    if large.tolist() == [NOISE]:
        segments = np.full(n, NOISE, dtype=np.int64)
    position = np.full(n, -1, dtype=np.int64)
    in_large = np.isin(segments, large)
    position[in_large] = np.searchsorted(large, segments[in_large])
    distance_z = np.empty(n)
    rows = np.flatnonzero(in_large)
    distance = np.linalg.norm((matrix[rows] - centres[position[rows]]) / scales[position[rows]], axis=1)
    distance_z[rows] = (distance - spread[position[rows], 0]) / spread[position[rows], 1]

    outside = np.flatnonzero(~in_large)
    if len(outside):
        candidates = np.stack(
            [
                (np.linalg.norm((matrix[outside] - centres[i]) / scales[i], axis=1) - spread[i, 0])
                / spread[i, 1]
                for i in range(len(large))
            ],
            axis=1,
        )
        position[outside] = candidates.argmin(axis=1)
        distance_z[outside] = candidates.min(axis=1)

    deviations = ((matrix - centres[position]) / scales[position]).astype(np.float32)
    return SegmentDeviation(
        reference=large[position],
        deviations=deviations,
        distance_z=distance_z,
        large_segments=large,
    )


def _median_and_spread(values: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(values))
    spread = MAD_TO_SD * float(np.median(np.abs(values - centre)))
    if spread <= 1e-12:
        spread = float(values.std())
    return centre, spread if spread > 1e-12 else 1.0


def detector_scores(matrix: np.ndarray, name: Detector, settings: AnomalySettings) -> np.ndarray:
    """Outlier scores (higher is stranger) of `name`, fitted on at most
    `detector_sample_size` devices and applied to all."""
    return fit_detector(matrix, replace(settings, detector=name))[1]


def fit_detector(matrix: np.ndarray, settings: AnomalySettings) -> tuple[DetectorNorms, np.ndarray]:
    """The detector fitted on at most `detector_sample_size` robust-standardised devices, and its
    scores of every device (higher is stranger)."""
    if len(matrix) < 3:
        return DetectorNorms.none(settings.detector, matrix.shape[1]), np.zeros(len(matrix))
    centre, scale = robust_standardisation(matrix)
    standardised = (matrix - centre) / scale
    detector = make_detector(settings.detector, settings.random_seed, len(matrix))
    if len(standardised) <= settings.detector_sample_size:
        detector.fit(standardised)
        scores = np.asarray(detector.decision_scores_, dtype=np.float64)
    else:
        rng = np.random.default_rng(settings.random_seed)
        sample = np.sort(rng.choice(len(standardised), size=settings.detector_sample_size, replace=False))
        detector.fit(standardised[sample])
        scores = _decision_function(detector, standardised)
    score_centre, score_spread = robust_location(scores)
    return DetectorNorms(settings.detector, centre, scale, detector, score_centre, score_spread), scores


def _decision_function(detector: Any, standardised: np.ndarray) -> np.ndarray:
    if len(standardised) == 0:
        return np.zeros(0)
    return np.concatenate(
        [
            np.asarray(detector.decision_function(standardised[start : start + 100_000]), dtype=np.float64)
            for start in range(0, len(standardised), 100_000)
        ]
    )


def make_detector(name: Detector, random_seed: int, rows: int) -> Any:
    if name == "hbos":
        from pyod.models import hbos

        _cache_hbos_compilation(hbos)
        return hbos.HBOS()
    if name == "ecod":
        from pyod.models.ecod import ECOD

        return ECOD()
    if name == "copod":
        from pyod.models.copod import COPOD

        return COPOD()
    if name == "iforest":
        from pyod.models.iforest import IForest

        return IForest(random_state=random_seed)
    if name == "knn":
        from pyod.models.knn import KNN

        return KNN(n_neighbors=min(5, rows - 1))
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


def _cache_hbos_compilation(module: ModuleType) -> None:
    """PyOD compiles HBOS's scoring loop with numba in every process (about 5 s, more than the
    scoring itself on a fleet of thousands) and does not cache it; recompile it once with numba's
    on-disk cache. Left alone if a PyOD version no longer has that function."""
    compiled = getattr(module, "_calculate_outlier_scores", None)
    if compiled is None or not hasattr(compiled, "py_func") or getattr(compiled, "_disk_cached", False):
        return
    import numba

    cached = numba.njit(cache=True)(compiled.py_func)
    cached._disk_cached = True
    module._calculate_outlier_scores = cached
