"""Learning key weights from responses to offers. Pure: no Dagster.

For each trigger with enough responses, an L1-regularised logistic regression (strength
chosen by cross-validation) predicts acceptance from the persona values at offer time
(the transformed, unweighted value of each dimension, standardised), plus the value of
the dimension the offer is about (the use of the app a tutorial teaches). A key's
importance is the largest absolute coefficient among its dimensions (and, for the keys
offers were about, that extra column's), averaged over triggers by their number of
responses. Importances are scaled so their mean equals the mean current weight of
the keys that were learned, and each weight moves only part of the way there
(`learning_rate`), within a floor and a ceiling, so a few noisy batches cannot
wreck the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

# Inverse L1 strengths tried by cross-validation; the L1 penalty sets the coefficients of keys
# that do not predict acceptance to zero, so their weights decay instead of drifting on noise.
REGULARIZATION_GRID = np.logspace(-3, 1, 9)


@dataclass(frozen=True)
class LearningSettings:
    learning_rate: float = 0.3
    floor: float = 0.02
    ceiling: float = 2.0
    regularization: float = (
        1.0  # inverse L1 strength (scikit-learn's C) when too few answers to cross-validate
    )
    min_responses: int = 30
    # Responses per trigger the regression is fitted on (a fixed random sample above this): the
    # standardised coefficients settle long before, and the cross-validated fit grows with them.
    max_fit_responses: int = 50_000

    def __post_init__(self) -> None:
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1]; got {self.learning_rate}")
        if not 0 <= self.floor < self.ceiling:
            raise ValueError(f"need 0 <= floor < ceiling; got floor={self.floor}, ceiling={self.ceiling}")


@dataclass
class LearnedWeights:
    weights: dict[str, float]  # every key: new weight (unchanged where nothing was learned)
    table: pd.DataFrame  # key, old, new, importance, responses
    responses_by_trigger: dict[str, int]


def learn_weights(
    values: np.ndarray,
    accepted: np.ndarray,
    triggers: np.ndarray,
    dimension_keys: list[str],
    current: dict[str, float],
    settings: LearningSettings,
    offered_dimension: np.ndarray | None = None,
) -> LearnedWeights:
    """New weights from responded offers: `values` (offers x dimensions, unweighted persona
    values at offer time), `accepted` (bool), `triggers` (per offer); `dimension_keys` names
    the weight key of each dimension. `offered_dimension` (per offer, -1 for none) is the
    dimension the offer is about, such as the use of the app a tutorial teaches: its value
    enters the regression as one more column, whose importance goes to the keys offered."""
    keys = pd.Index(dimension_keys)
    importance = pd.Series(np.nan, index=keys.unique())
    learned_from = 0
    counts: dict[str, int] = {}
    if offered_dimension is None:
        offered_dimension = np.full(len(values), -1)
    for trigger in sorted(set(triggers.tolist())):
        rows = triggers == trigger
        counts[trigger] = int(rows.sum())
        y = accepted[rows]
        if rows.sum() < settings.min_responses or y.all() or not y.any():
            continue
        offered = offered_dimension[rows]
        x = values[rows]
        if len(y) > settings.max_fit_responses:
            sample = _fit_sample(y, settings.max_fit_responses)
            x, y, offered = x[sample], y[sample], offered[sample]
        about = offered >= 0
        if about.any():
            x = np.column_stack([x, np.where(about, x[np.arange(len(x)), np.maximum(offered, 0)], 0.0)])
        coefficients = _standardised_coefficients(x, y, settings.regularization)
        # NaN where a dimension did not vary: no information, not "unimportant".
        per_key = pd.Series(np.abs(coefficients[: len(keys)]), index=keys).groupby(level=0).max()
        if about.any() and not np.isnan(coefficients[-1]):
            offered_keys = keys[np.unique(offered[about])]
            per_key[offered_keys] = np.fmax(per_key[offered_keys], abs(coefficients[-1]))
        importance = importance.add(per_key * rows.sum(), fill_value=0.0).where(
            importance.notna() | per_key.notna()
        )
        learned_from += int(rows.sum())

    old = pd.Series({key: current.get(key, 0.0) for key in importance.index}, dtype="float64")
    new = old.copy()
    if learned_from:
        importance = importance / learned_from
        informative = importance.index[importance.notna()]
        mean_importance = importance[informative].mean()
        if mean_importance > 0:
            target = old[informative].mean() * importance[informative] / mean_importance
            blended = (1 - settings.learning_rate) * old[informative] + settings.learning_rate * target
            new[informative] = blended.clip(settings.floor, settings.ceiling)
    weights = {**current, **new.to_dict()}
    table = pd.DataFrame(
        {
            "key": importance.index,
            "old": old.to_numpy(),
            "new": new.to_numpy(),
            "importance": importance.to_numpy(),
        }
    )
    return LearnedWeights(weights=weights, table=table, responses_by_trigger=counts)


def _fit_sample(accepted: np.ndarray, size: int) -> np.ndarray:
    """Row positions of a fixed random sample of `size`, keeping the share accepted."""
    rng = np.random.default_rng(LIBLINEAR_SEED)
    chosen = []
    for label in (True, False):
        rows = np.flatnonzero(accepted == label)
        take = max(1, round(size * len(rows) / len(accepted)))
        chosen.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))


# liblinear visits the samples in a random order: unseeded, two runs on the same responses
# learn weights that differ in the fourth decimal, and everything downstream with them.
LIBLINEAR_SEED = 0


def _standardised_coefficients(x: np.ndarray, y: np.ndarray, regularization: float) -> np.ndarray:
    spread = x.std(axis=0)
    varying = spread > 1e-9
    coefficients = np.full(x.shape[1], np.nan)
    if not varying.any():
        return coefficients
    standardised = (x[:, varying] - x[:, varying].mean(axis=0)) / spread[varying]
    folds = int(min(5, y.sum(), (~y).sum()))
    if folds >= 2:
        model = LogisticRegressionCV(
            Cs=REGULARIZATION_GRID,
            cv=folds,
            l1_ratios=(1.0,),
            solver="liblinear",
            scoring="neg_log_loss",
            use_legacy_attributes=False,
            random_state=LIBLINEAR_SEED,
        ).fit(standardised, y)
    else:
        model = LogisticRegression(
            C=regularization, l1_ratio=1.0, solver="liblinear", random_state=LIBLINEAR_SEED
        ).fit(standardised, y)
    coefficients[varying] = model.coef_[0]
    return coefficients


def unweighted(matrix: np.ndarray, dimension_weights: np.ndarray) -> np.ndarray:
    """Persona values before weighting (0 where a dimension's weight is 0)."""
    safe = np.where(dimension_weights > 0, dimension_weights, 1.0)
    return np.where(dimension_weights > 0, matrix / safe, 0.0)
