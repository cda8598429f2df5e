"""Segment profiles: what sets each segment apart from the fleet, in words. Pure.

A group's effect is how far the segment's typical value sits from the fleet's:
for numbers, the median's distance in robust fleet spreads; for categories, the
over-representation of a value in binomial standard deviations of its fleet share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from persona_pipeline.formatting import format_share, format_values
from persona_pipeline.segments.key_stats import ReadableValues, SegmentStats

MIN_EFFECT = 0.5
TRAIT_COLUMNS = ["segment", "group", "effect", "short", "text"]


def segment_traits(values: ReadableValues, stats: SegmentStats, top: int = 3) -> pd.DataFrame:
    """The `top` groups that set each segment apart: segment, rank, group, effect, short, text.

    `short` is the trait alone ("games use 2.5 h"); `text` adds the fleet's value.
    """
    numeric = _numeric_traits(values, stats)
    categorical = _categorical_traits(values, stats)
    traits = pd.concat([numeric, categorical], ignore_index=True)
    traits = traits[traits["effect"].abs() >= MIN_EFFECT]
    traits = traits.assign(strength=traits["effect"].abs()).sort_values(
        ["segment", "strength", "group"], ascending=[True, False, True]
    )
    traits = traits.groupby("segment", sort=True).head(top).copy()
    traits["rank"] = traits.groupby("segment").cumcount()
    return traits.drop(columns="strength").reset_index(drop=True)


def _numeric_traits(values: ReadableValues, stats: SegmentStats) -> pd.DataFrame:
    frame = stats.quantiles.reset_index()
    if frame.empty:
        return pd.DataFrame(columns=TRAIT_COLUMNS)
    fleet = stats.fleet_quantiles.reindex(frame["group"])
    frame["effect"] = (frame["p50"].to_numpy() - fleet["p50"].to_numpy()) / fleet["scale"].to_numpy()
    frame["fleet_p50"] = fleet["p50"].to_numpy()
    frame = frame.dropna(subset=["effect"])
    parts = []
    for group, rows in frame.groupby("group", sort=False):
        label, unit = values.groups.loc[group, ["label", "unit"]]
        value = format_values(rows["p50"], unit)
        fleet_value = format_values(rows["fleet_p50"], unit)
        short = label + " " + value
        parts.append(
            pd.DataFrame(
                {
                    "segment": rows["segment"].to_numpy(),
                    "group": group,
                    "effect": rows["effect"].to_numpy(),
                    "short": short.to_numpy(),
                    "text": (short + " (fleet " + fleet_value + ")").to_numpy(),
                }
            )
        )
    # A numeric key the whole fleet reports alike has no spread, so no effect: no trait.
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TRAIT_COLUMNS)


def _categorical_traits(values: ReadableValues, stats: SegmentStats) -> pd.DataFrame:
    shares = stats.shares.merge(stats.fleet_shares, on=["group", "value"], suffixes=("", "_fleet"))
    if shares.empty:
        return pd.DataFrame(columns=TRAIT_COLUMNS)
    p = shares["share_fleet"].clip(1e-6, 1 - 1e-6)
    shares["effect"] = (shares["share"] - p) / np.sqrt(p * (1 - p))
    best = shares.sort_values("effect", ascending=False).groupby(["segment", "group"]).head(1)
    best = best[best["effect"] > 0]
    labels = values.groups["label"].reindex(best["group"]).to_numpy()
    yes_no = best["value"].isin(["yes", "no"]).to_numpy()
    shown_value = np.where(yes_no & (best["value"] == "yes").to_numpy(), "", " " + best["value"])
    short = pd.Series(labels + shown_value, index=best.index) + " " + format_share(best["share"]).to_numpy()
    text = short + " (fleet " + format_share(best["share_fleet"]).to_numpy() + ")"
    return pd.DataFrame(
        {
            "segment": best["segment"].to_numpy(),
            "group": best["group"].to_numpy(),
            "effect": best["effect"].to_numpy(),
            "short": short.to_numpy(),
            "text": text.to_numpy(),
        }
    )


def describe_segments(stats: SegmentStats, traits: pd.DataFrame, names_from: int = 2) -> pd.DataFrame:
    """One row per segment: segment, devices, share, name (its first traits), traits."""
    sizes = stats.sizes
    ordered = traits.sort_values(["segment", "rank"])
    name = ordered[ordered["rank"] < names_from].groupby("segment")["short"].agg(" · ".join)
    described = ordered.groupby("segment")["text"].agg("; ".join)
    frame = pd.DataFrame(
        {
            "segment": sizes.index.to_numpy(),
            "devices": sizes.to_numpy(),
            "share": sizes.to_numpy() / max(int(sizes.sum()), 1),
        }
    )
    frame["name"] = name.reindex(sizes.index).fillna("like the fleet").to_numpy()
    frame["traits"] = described.reindex(sizes.index).fillna("no key sets it apart").to_numpy()
    return frame
