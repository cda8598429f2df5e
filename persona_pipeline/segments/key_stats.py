"""Raw key values per device and their typical values per segment, for people to read. Pure.

Vectors are for machines; reasons and segment profiles speak in the keys' own
units ("signal -108 dBm vs -74 to -66 dBm"). A *group* is what a person reads as
one thing: a key (all one-hot dimensions of a categorical key together), one app
of a key pattern, a pattern's other apps, or a derived metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_pipeline.feature_schema import OTHER, FeatureSchema

NUMERIC = "numeric"
CATEGORICAL = "categorical"
READABLE_COLUMNS = ("device_id", "key", "value", "value_number")  # the profile columns read here


@dataclass
class ReadableValues:
    numeric: pd.DataFrame  # device_id x numeric groups, raw values
    categorical: pd.DataFrame  # device_id x categorical groups, raw values as text
    groups: pd.DataFrame  # index group: kind, label, unit


def dimension_groups(schema: FeatureSchema) -> list[str]:
    """The group each persona dimension belongs to, in dimension order."""
    kinds = {f.key: f.type for f in schema.features}
    return [d.weight_key if kinds.get(d.weight_key) == "categorical" else d.name for d in schema.dimensions]


def readable_values(
    profiles: pd.DataFrame,
    schema: FeatureSchema,
    device_ids: np.ndarray,
    vectors: pd.DataFrame,
) -> ReadableValues:
    """Raw values of every group for `device_ids` (rows in that order).

    A numeric key a device never reported reads as the feature's `fill`, else 0
    (an app it does not use), as its vector sees it. `profiles`: device_profiles
    rows; `vectors`: persona vectors (device_id x dimension names), for metrics
    that only exist in vector form.
    """
    index = pd.Index(device_ids, name="device_id")
    feature_of = {key: schema.feature_for(key) for key in profiles["key"].unique().tolist()}
    known = profiles[profiles["key"].isin([k for k, f in feature_of.items() if f is not None])]
    kind = known["key"].map({k: f.type for k, f in feature_of.items() if f is not None})

    numeric_rows = known[kind == "numeric"]
    numeric_wide = numeric_rows.pivot(index="device_id", columns="key", values="value_number").reindex(index)
    numeric: dict[str, pd.Series] = {}
    categorical: dict[str, pd.Series] = {}
    for feature in schema.features:
        if feature.type == "numeric" and not feature.is_pattern:
            numeric[feature.key] = _column(numeric_wide, feature.key, index).fillna(feature.fill or 0.0)
        elif feature.type == "numeric":
            matches = [c for c in numeric_wide.columns if feature.regex.match(c)]
            expanded = {feature.concrete_key(name) for name in feature.expand or ()}
            for key in sorted(expanded, key=lambda k: [d.name for d in schema.dimensions].index(k)):
                numeric[key] = _column(numeric_wide, key, index).fillna(0.0)
            others = [c for c in matches if c not in expanded]
            numeric[f"{feature.key}[{OTHER}]"] = numeric_wide[others].sum(axis=1)
        else:
            rows = known[known["key"] == feature.key]
            values = rows.set_index("device_id")["value"].reindex(index)
            if feature.type == "boolean":
                values = values.map({"true": "yes", "false": "no"})
            categorical[feature.key] = values

    for derived in schema.derived:
        source = next(f for f in schema.features if f.key == derived.key)
        if derived.kind == "sum":
            matches = [c for c in numeric_wide.columns if source.regex.match(c)]
            numeric[derived.name] = numeric_wide[matches].sum(axis=1)
        else:
            flag = vectors[derived.name].reindex(index).to_numpy() > 0
            categorical[derived.name] = pd.Series(np.where(flag, "yes", "no"), index=index)

    groups = pd.DataFrame(
        {
            "kind": [NUMERIC] * len(numeric) + [CATEGORICAL] * len(categorical),
            "label": [schema.label_for(name) for name in (*numeric, *categorical)],
            "unit": [schema.unit_for(name) for name in (*numeric, *categorical)],
        },
        index=pd.Index([*numeric, *categorical], name="group"),
    )
    return ReadableValues(
        numeric=pd.DataFrame(numeric, index=index),
        categorical=pd.DataFrame(categorical, index=index),
        groups=groups,
    )


def _column(wide: pd.DataFrame, key: str, index: pd.Index) -> pd.Series:
    return wide[key] if key in wide.columns else pd.Series(np.nan, index=index)


@dataclass
class SegmentStats:
    """Typical values per segment and for the whole fleet."""

    sizes: pd.Series  # segment -> devices
    quantiles: pd.DataFrame  # (segment, group) -> p25, p50, p75
    fleet_quantiles: pd.DataFrame  # group -> p25, p50, p75, scale
    shares: pd.DataFrame  # segment, group, value, share (of devices that reported the group)
    fleet_shares: pd.DataFrame  # group, value, share


def segment_stats(values: ReadableValues, segments: np.ndarray) -> SegmentStats:
    segment = pd.Series(segments, index=values.numeric.index, name="segment")
    numeric = values.numeric
    grouped = numeric.groupby(segment.to_numpy()).quantile([0.25, 0.5, 0.75])
    grouped.index = grouped.index.set_names(["segment", "q"])
    quantiles = grouped.stack(future_stack=True).unstack("q")
    quantiles.columns = ["p25", "p50", "p75"]
    quantiles.index = quantiles.index.set_names(["segment", "group"])

    fleet = numeric.quantile([0.25, 0.5, 0.75]).T
    fleet.columns = ["p25", "p50", "p75"]
    spread = (fleet["p75"] - fleet["p25"]) / 1.349
    fleet["scale"] = spread.where(spread > 0, numeric.std()).replace(0, np.nan)

    long = values.categorical.assign(segment=segment).melt(
        id_vars="segment", var_name="group", value_name="value"
    )
    long = long.dropna(subset=["value"])
    counts = long.groupby(["segment", "group", "value"], observed=True).size().rename("count").reset_index()
    totals = counts.groupby(["segment", "group"])["count"].transform("sum")
    shares = counts.assign(share=counts["count"] / totals).drop(columns="count")
    fleet_counts = long.groupby(["group", "value"], observed=True).size().rename("count").reset_index()
    fleet_shares = fleet_counts.assign(
        share=fleet_counts["count"] / fleet_counts.groupby("group")["count"].transform("sum")
    ).drop(columns="count")
    return SegmentStats(
        sizes=segment.value_counts().sort_index(),
        quantiles=quantiles,
        fleet_quantiles=fleet,
        shares=shares,
        fleet_shares=fleet_shares,
    )
