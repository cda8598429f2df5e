"""Reasons a person can check: the keys that deviate most, the device's value against the
segment's typical one. Pure.

"crashes 21 vs 0–1; battery drain 20%/h vs 4.1–5.9%/h; signal -108 dBm vs -74 to -65 dBm
(segment 3: distance z 14.2, hbos z 2.3)"
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from persona_pipeline.anomalies.scoring import AnomalyResult
from persona_pipeline.formatting import format_range, format_share, format_values
from persona_pipeline.segments.clustering import NOISE
from persona_pipeline.segments.key_stats import CATEGORICAL, ReadableValues, SegmentStats

MIN_KEY_DEVIATION = 2.0


def explain(
    rows: np.ndarray,
    result: AnomalyResult,
    dimension_groups: list[str],
    values: ReadableValues,
    stats: SegmentStats,
    keys: int = 3,
) -> pd.Series:
    """A reason for each device row in `rows` (index: the row numbers)."""
    return explain_with_causes(rows, result, dimension_groups, values, stats, keys)["reason"]


def explain_with_causes(
    rows: np.ndarray,
    result: AnomalyResult,
    dimension_groups: list[str],
    values: ReadableValues,
    stats: SegmentStats,
    keys: int = 3,
) -> pd.DataFrame:
    """`reason` and `cause` (the key that deviates most, or `segment_distance`) per row in `rows`."""
    if len(rows) == 0:
        return pd.DataFrame({"reason": pd.Series([], dtype=object), "cause": pd.Series([], dtype=object)})
    deviation = pd.DataFrame(np.abs(result.deviation.deviations[rows]), columns=dimension_groups)
    by_group = deviation.T.groupby(level=0, sort=False).max().T
    reference = result.deviation.reference[rows]
    categorical = [g for g in by_group.columns if g in values.categorical.columns]
    by_group[categorical] = _category_surprise(rows, reference, categorical, values, stats)
    picks = _top_groups(by_group, keys)
    picks["segment"] = reference[picks["position"].to_numpy()]
    picks["row"] = rows[picks["position"].to_numpy()]
    cause = picks[picks["rank"] == 0].set_index("position")["group"].reindex(np.arange(len(rows)))
    if picks.empty:
        joined = pd.Series(np.nan, index=np.arange(len(rows)), dtype=object)
    else:
        phrases = _phrases(picks, values, stats)
        joined = phrases.sort_values(["position", "rank"]).groupby("position")["text"].agg("; ".join)
    joined = joined.reindex(np.arange(len(rows))).fillna("no single key stands out")
    compared_with = pd.Series(np.where(reference == NOISE, "the fleet", "segment " + reference.astype(str)))
    signals = (
        " ("
        + compared_with
        + ": distance z "
        + pd.Series(result.segment_z[rows]).round(1).astype(str)
        + f", {result.settings.detector} z "
        + pd.Series(result.detector_z[rows]).round(1).astype(str)
        + ", p "
        + pd.Series(result.p_value[rows]).map(lambda p: f"{p:.1g}")
        + ")"
    )
    return pd.DataFrame(
        {"reason": (joined + signals).to_numpy(), "cause": cause.fillna("segment_distance").to_numpy()},
        index=rows,
    )


def _category_surprise(
    rows: np.ndarray, reference: np.ndarray, groups: list[str], values: ReadableValues, stats: SegmentStats
) -> np.ndarray:
    """How unusual each device's category is in its segment, as the z of that category's
    indicator: sqrt((1 - s) / s) for segment share s (a 4% value: 4.9; a 21% value: 1.9)."""
    device_values = values.categorical[groups].iloc[rows].reset_index(drop=True)
    long = device_values.assign(segment=reference).melt(
        id_vars="segment", var_name="group", ignore_index=False
    )
    shares = stats.shares.set_index(["segment", "group", "value"])["share"]
    found = shares.reindex(pd.MultiIndex.from_frame(long[["segment", "group", "value"]])).to_numpy()
    share = np.clip(np.nan_to_num(found, nan=0.0), 0.01, 1.0)
    # A key the device never reported says nothing about it: no surprise.
    long["surprise"] = np.where(long["value"].isna(), 0.0, np.sqrt((1 - share) / share))
    wide = long.reset_index().pivot(index="index", columns="group", values="surprise")
    return wide.reindex(index=np.arange(len(rows)), columns=groups).fillna(0.0).to_numpy()


def _top_groups(by_group: pd.DataFrame, keys: int) -> pd.DataFrame:
    strength = by_group.to_numpy()
    order = np.argsort(-strength, axis=1, kind="stable")[:, :keys]
    picked = np.take_along_axis(strength, order, axis=1)
    position, rank = np.nonzero(picked >= MIN_KEY_DEVIATION)
    return pd.DataFrame(
        {
            "position": position,
            "rank": rank,
            "group": by_group.columns.to_numpy()[order[position, rank]],
        }
    )


def _phrases(picks: pd.DataFrame, values: ReadableValues, stats: SegmentStats) -> pd.DataFrame:
    groups = values.groups.reindex(picks["group"])
    picks = picks.assign(
        kind=groups["kind"].to_numpy(), label=groups["label"].to_numpy(), unit=groups["unit"].to_numpy()
    )
    parts = []
    for (kind, unit), block in picks.groupby(["kind", picks["unit"].fillna("")], sort=False):
        unit = unit or None
        if kind == CATEGORICAL:
            text = _categorical_phrase(block, values, stats)
        else:
            text = _numeric_phrase(block, values, stats, unit)
        labelled = pd.Series(block["label"].to_numpy()) + " " + text.reset_index(drop=True)
        parts.append(block.assign(text=labelled.to_numpy()))
    return pd.concat(parts, ignore_index=True)


def _numeric_phrase(
    block: pd.DataFrame, values: ReadableValues, stats: SegmentStats, unit: str | None
) -> pd.Series:
    columns = values.numeric.columns.get_indexer(block["group"])
    device_values = values.numeric.to_numpy()[block["row"].to_numpy(), columns]
    typical = stats.quantiles.reindex(pd.MultiIndex.from_arrays([block["segment"], block["group"]]))
    return (
        format_values(device_values, unit)
        + " vs "
        + format_range(typical["p25"].reset_index(drop=True), typical["p75"].reset_index(drop=True), unit)
    )


def _categorical_phrase(block: pd.DataFrame, values: ReadableValues, stats: SegmentStats) -> pd.Series:
    """ "3g (5% of segment) vs wifi 47%", or "Moto G (21% of segment)" when it is the commonest."""
    columns = values.categorical.columns.get_indexer(block["group"])
    device_values = pd.Series(values.categorical.to_numpy()[block["row"].to_numpy(), columns]).fillna(
        "not reported"
    )
    keys = pd.MultiIndex.from_arrays([block["segment"], block["group"]])
    shares = stats.shares.set_index(["segment", "group", "value"])["share"]
    own_share = shares.reindex(
        pd.MultiIndex.from_arrays([block["segment"], block["group"], device_values])
    ).fillna(0.0)
    top = stats.shares.sort_values("share", ascending=False).drop_duplicates(["segment", "group"])
    typical = top.set_index(["segment", "group"]).reindex(keys).reset_index(drop=True)
    own = device_values + " (" + format_share(own_share.to_numpy()) + " of segment)"
    versus = " vs " + typical["value"].fillna("?") + " " + format_share(typical["share"].fillna(0.0))
    return own + versus.where(typical["value"] != device_values, "")
