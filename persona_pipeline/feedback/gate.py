"""The weights gate: a candidate weights version goes live only when shown better. Pure: no Dagster.

Evidence. Responded offers are split by a stable hash of the device: the held-out share is never
learned from. Per trigger, a logistic regression with a fixed L2 penalty is fitted on the learned
offers' weighted persona values, once with the live weights and once with the candidate's, and
predicts each held-out offer's acceptance. Scaling a dimension by its weight is the same as
loosening the penalty on its coefficient, so the weights act as prior scales: weights that put
their scale on the keys that predict acceptance predict better. The per-offer difference in
log-loss (live minus candidate) is the improvement; its mean, with a one-sided lower confidence
bound clustered by device (a device's answers come from one persona), is the evidence. Under
answers that no key predicts, a candidate that moved weight onto noise predicts no better
(usually worse) and the bound stays below zero.

Guardrails, measured on a fixed sample of the fleet's current vectors: segments (K-means keeping
the live segments' number, started from their centres, as device_clusters does for a new weights
version) with the candidate weights
against the live segments (adjusted Rand index), and the devices flagged with the candidate
weights against the live ones. Offer volume is held by the contact policy (weekly budget, daily
capacity), which no weights change; `persona-pipeline evaluate decisions` measures it after
each refresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score

from persona_pipeline.anomalies.scoring import AnomalySettings, score_anomalies
from persona_pipeline.segments.clustering import ClusteringSettings, fit_segments, segment_centres

MIN_GUARDRAIL_DEVICES = 20  # devices with a segment below which the guardrails are not measured
MIN_REFERENCE = 10  # learned offers of a trigger below which it is left out of the evidence
# pandas' vectorised hash with a key of our own: the split must not change between versions.
HASH_KEY = "persona-held-out"


@dataclass(frozen=True)
class GateSettings:
    held_out_share: float = 0.3
    penalty_c: float = 0.1  # inverse L2 strength of the held-out predictor
    confidence: float = 0.95  # one-sided, of the improvement's lower bound
    min_held_out: int = 100  # held-out devices with answers below this: no evidence, the candidate waits
    min_segment_ari: float = 0.7
    max_flag_ratio: float = 1.2
    flag_slack: int = 3  # flags the candidate may add above the ratio (small fleets)
    sample_size: int = 20_000  # devices the guardrails are measured on
    max_reference: int = 50_000  # learned offers per trigger the predictor is fitted on
    random_seed: int = 0
    # Shares of the step from the live weights to the learned ones tried, longest first, while the
    # evidence holds and a guardrail does not: weights move by what the fleet's segments can take.
    steps: tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        if not 0 < self.held_out_share < 1:
            raise ValueError(f"held_out_share must be in (0, 1); got {self.held_out_share}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1); got {self.confidence}")


def held_out(device_ids: pd.Series | np.ndarray, share: float) -> np.ndarray:
    """Whether each device's answers are held out from learning: a stable hash of its id, so a
    device stays on its side across refreshes and runs."""
    ids = pd.Series(np.asarray(device_ids, dtype=object)).astype(str)
    hashes = pd.util.hash_pandas_object(ids, index=False, hash_key=HASH_KEY).to_numpy(dtype=np.uint64)
    return (hashes % np.uint64(10_000)).astype(np.float64) / 10_000 < share


@dataclass(frozen=True)
class Evidence:
    held_out_offers: int
    held_out_devices: int
    live_log_loss: float
    candidate_log_loss: float
    improvement: float  # mean per-offer log-loss, live minus candidate (> 0: candidate better)
    lower_bound: float  # one-sided lower confidence bound of the improvement
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def prior_scale_log_loss(
    weighted: np.ndarray,
    accepted: np.ndarray,
    triggers: np.ndarray,
    learned: np.ndarray,
    settings: GateSettings,
) -> np.ndarray:
    """Per held-out offer (`~learned`, in order): the log-loss of predicting its acceptance with an
    L2-penalised logistic regression fitted per trigger on the learned offers' `weighted` values
    (not standardised: a dimension's weight is the prior scale of its coefficient, so weights that
    put their scale on the keys that predict acceptance predict better at the same penalty). NaN
    where the trigger's learned offers are too few or all alike."""
    losses = np.full(int((~learned).sum()), np.nan)
    positions = np.flatnonzero(~learned)
    rng = np.random.default_rng(settings.random_seed)
    for trigger in np.unique(triggers):
        reference = np.flatnonzero(learned & (triggers == trigger))
        target = np.flatnonzero(~learned & (triggers == trigger))
        if len(target) == 0 or len(reference) < MIN_REFERENCE:
            continue
        if len(reference) > settings.max_reference:
            reference = np.sort(rng.choice(reference, settings.max_reference, replace=False))
        y_reference = accepted[reference]
        if y_reference.all() or not y_reference.any():
            continue
        model = LogisticRegression(C=settings.penalty_c).fit(weighted[reference], y_reference)
        chance = np.clip(model.predict_proba(weighted[target])[:, 1], 1e-3, 1 - 1e-3)
        y = accepted[target]
        losses[np.searchsorted(positions, target)] = -(y * np.log(chance) + (~y) * np.log(1 - chance))
    return losses


def held_out_evidence(
    unweighted_values: np.ndarray,
    accepted: np.ndarray,
    triggers: np.ndarray,
    learned: np.ndarray,
    live_weights: np.ndarray,
    candidate_weights: np.ndarray,
    settings: GateSettings,
    device_ids: np.ndarray,
) -> Evidence:
    """The candidate's improvement over the live weights on the held-out offers (`~learned`). A
    device answers several offers from nearly the same persona, so its answers are not
    independent: the bound's spread is clustered by device (`device_ids`, per offer), and the
    evidence counts devices as well as offers."""
    accepted = np.asarray(accepted, dtype=bool)
    live = prior_scale_log_loss(unweighted_values * live_weights, accepted, triggers, learned, settings)
    candidate = prior_scale_log_loss(
        unweighted_values * candidate_weights, accepted, triggers, learned, settings
    )
    known = ~np.isnan(live) & ~np.isnan(candidate)
    difference = live[known] - candidate[known]
    devices = np.asarray(device_ids, dtype=object)[~learned][known]
    n = len(difference)
    if n == 0:
        return Evidence(0, 0, float("nan"), float("nan"), float("nan"), float("nan"), settings.confidence)
    mean = float(difference.mean())
    codes, _ = pd.factorize(pd.Series(devices).astype(str))
    groups = int(codes.max()) + 1
    # Cluster-robust standard error of the mean: the residuals summed per device.
    per_device = np.bincount(codes, weights=difference - mean, minlength=groups)
    spread = np.sqrt(groups / (groups - 1) * np.sum(per_device**2)) / n if groups > 1 else float("inf")
    lower = float(mean - norm.ppf(settings.confidence) * spread)
    return Evidence(
        n,
        groups,
        float(live[known].mean()),
        float(candidate[known].mean()),
        mean,
        lower,
        settings.confidence,
    )


@dataclass(frozen=True)
class Guardrails:
    devices: int
    segments_live: int
    segments_candidate: int
    segment_ari: float  # NaN when not measured (the feature schema changed)
    flagged_live: int
    flagged_candidate: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def guardrails(
    unweighted_vectors: np.ndarray,
    live_segments: np.ndarray,
    live_weights: np.ndarray,
    candidate_weights: np.ndarray,
    roles: np.ndarray,
    settings: GateSettings,
    clustering: ClusteringSettings | None = None,
    anomalies: AnomalySettings | None = None,
) -> Guardrails | None:
    """Segments and flags with the candidate weights against the live ones, on a fixed sample of
    the fleet (`unweighted_vectors` and `live_segments`, the stored assignment, in the same order).
    None on fewer than MIN_GUARDRAIL_DEVICES devices: too few to measure either."""
    clustering = clustering or ClusteringSettings()
    anomalies = anomalies or AnomalySettings()
    rng = np.random.default_rng(settings.random_seed)
    rows = np.arange(len(unweighted_vectors))
    if len(rows) > settings.sample_size:
        rows = np.sort(rng.choice(rows, settings.sample_size, replace=False))
    values, live_labels = unweighted_vectors[rows], np.asarray(live_segments)[rows]
    if len(values) < MIN_GUARDRAIL_DEVICES:
        return None
    live_matrix, candidate_matrix = values * live_weights, values * candidate_weights
    _, start_labels = np.unique(live_labels, return_inverse=True)
    start = segment_centres(candidate_matrix, start_labels) if len(values) else None
    fit = fit_segments(candidate_matrix, clustering, start, keep_count=True)
    flagged_live = score_anomalies(live_matrix, start_labels, anomalies, roles=roles).is_anomaly
    flagged_candidate = score_anomalies(candidate_matrix, fit.labels, anomalies, roles=roles).is_anomaly
    return Guardrails(
        devices=len(rows),
        segments_live=len(np.unique(live_labels)),
        segments_candidate=fit.n_segments,
        segment_ari=float(adjusted_rand_score(live_labels, fit.labels)) if len(rows) else float("nan"),
        flagged_live=int(flagged_live.sum()),
        flagged_candidate=int(flagged_candidate.sum()),
    )


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str


def decide(evidence: Evidence, rails: Guardrails | None, settings: GateSettings) -> Decision:
    """Live when the improvement's lower bound is above zero and every guardrail holds."""
    if evidence.held_out_devices < settings.min_held_out:
        return Decision(
            False,
            f"too little held-out feedback: {evidence.held_out_offers} answered offers from "
            f"{evidence.held_out_devices} devices (at least {settings.min_held_out} devices)",
        )
    better = (
        f"held-out log-loss {evidence.live_log_loss:.4f} live, {evidence.candidate_log_loss:.4f} candidate "
        f"(improvement {evidence.improvement:+.4f}, {evidence.confidence:.0%} lower bound "
        f"{evidence.lower_bound:+.4f}, {evidence.held_out_offers} offers from "
        f"{evidence.held_out_devices} devices)"
    )
    if not evidence.lower_bound > 0:
        return Decision(False, f"not shown better: {better}")
    if rails is not None:
        if not np.isnan(rails.segment_ari) and rails.segment_ari < settings.min_segment_ari:
            return Decision(
                False,
                f"segments would move: adjusted Rand index {rails.segment_ari:.2f} against the live "
                f"segments (at least {settings.min_segment_ari}); {better}",
            )
        allowed = max(settings.max_flag_ratio * rails.flagged_live, rails.flagged_live + settings.flag_slack)
        if rails.flagged_candidate > allowed:
            return Decision(
                False,
                f"flags would rise: {rails.flagged_candidate} against {rails.flagged_live} live "
                f"(at most {allowed:.0f}); {better}",
            )
    return Decision(True, f"shown better: {better}")
