"""Building persona vectors from profiles: transformed value x weight per dimension. Pure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_pipeline.feature_schema import OTHER, FeatureSchema


@dataclass
class PersonaVectors:
    device_ids: np.ndarray
    customer_ids: np.ndarray
    matrix: np.ndarray  # float32, devices x dimensions, already weighted
    dimension_names: list[str]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            self.matrix,
            index=pd.Index(self.device_ids, name="device_id"),
            columns=self.dimension_names,
        )


def build_persona_vectors(
    profiles: pd.DataFrame,
    customers: pd.Series,
    schema: FeatureSchema,
    weights: dict[str, float],
    changed_devices: dict[str, set[str]],
) -> PersonaVectors:
    """One weighted vector per device in `profiles`.

    `changed_devices` maps each `changed_within_days` metric name to the devices
    whose key changed within its window (see `profiles.value_changes`).
    """
    device_ids = np.sort(profiles["device_id"].unique().astype(object))
    rows = pd.Index(device_ids)
    names = schema.dimension_names
    column_of = {name: i for i, name in enumerate(names)}
    raw = np.full((len(device_ids), len(names)), np.nan)

    feature_of = {k: schema.feature_for(k) for k in profiles["key"].unique().tolist()}
    kind_of = {k: f.type for k, f in feature_of.items() if f is not None}
    kind_all = profiles["key"].map(kind_of)
    known = profiles[kind_all.notna()]
    kind = kind_all[kind_all.notna()]
    row_index = rows.get_indexer(known["device_id"])

    numeric = (kind == "numeric").to_numpy()
    numeric_column = known["key"][numeric].map(
        {k: _numeric_column(k, f, column_of) for k, f in feature_of.items() if f and f.type == "numeric"}
    )
    cells = (row_index[numeric], numeric_column.to_numpy(dtype=np.int64))
    sums = np.zeros_like(raw)
    np.add.at(sums, cells, known["value_number"].to_numpy(dtype=np.float64)[numeric])
    reported = np.zeros(raw.shape, dtype=bool)
    reported[cells] = True
    raw = np.where(reported, sums, raw)

    categorical = (kind == "categorical").to_numpy()
    cat = known[categorical]
    cat_names = cat["key"] + "=" + cat["value"]
    in_vocabulary = cat_names.isin(column_of.keys())
    cat_columns = np.where(
        in_vocabulary,
        cat_names.map(column_of).fillna(-1),
        (cat["key"] + "=" + OTHER).map(column_of),
    ).astype(np.int64)
    raw[row_index[categorical], cat_columns] = 1.0

    boolean = (kind == "boolean").to_numpy()
    raw[row_index[boolean], known["key"][boolean].map(column_of).to_numpy(dtype=np.int64)] = (
        known["value"][boolean] == "true"
    ).to_numpy(dtype=np.float64)

    transformed = _transform(raw, schema, column_of)
    _add_derived(transformed, raw, schema, column_of, rows, changed_devices)
    weighted = transformed * schema.dimension_weights(weights)
    return PersonaVectors(
        device_ids=device_ids,
        customer_ids=customers.reindex(device_ids).to_numpy(dtype=object),
        matrix=weighted.astype(np.float32),
        dimension_names=names,
    )


def _numeric_column(key: str, feature, column_of: dict[str, int]) -> int:
    if not feature.is_pattern:
        return column_of[key]
    return column_of.get(key, column_of[f"{feature.key}[{OTHER}]"])


def _transform(raw: np.ndarray, schema: FeatureSchema, column_of: dict[str, int]) -> np.ndarray:
    out = np.zeros_like(raw)
    for feature in schema.features:
        columns = [column_of[d.name] for d in schema.dimensions if d.weight_key == feature.key]
        block = raw[:, columns]
        if feature.type == "numeric":
            filled = np.where(np.isnan(block), feature.fill if feature.fill is not None else np.nan, block)
            scaled = feature.transform.apply(filled)
            out[:, columns] = np.nan_to_num(scaled, nan=0.0)
        else:
            out[:, columns] = np.nan_to_num(block, nan=0.0)
    return out


def _add_derived(
    out: np.ndarray,
    raw: np.ndarray,
    schema: FeatureSchema,
    column_of: dict[str, int],
    rows: pd.Index,
    changed_devices: dict[str, set[str]],
) -> None:
    for derived in schema.derived:
        column = column_of[derived.name]
        if derived.kind == "sum":
            sources = [column_of[d.name] for d in schema.dimensions if d.weight_key == derived.key]
            total = np.nansum(raw[:, sources], axis=1)
            out[:, column] = derived.transform.apply(total)
        else:
            moved = rows.isin(list(changed_devices.get(derived.name, ())))
            out[:, column] = moved.astype(np.float64)


class ComputedVectors:
    """What a vectors run computed, over its pages: the devices (those with a vector before it,
    `previous`, seen or not; the others counted), those rewritten, and per dimension the devices
    with a value other than 0."""

    def __init__(self, previous: pd.Index, dimensions: int) -> None:
        self.previous = previous
        self.seen = np.zeros(len(previous), dtype=bool)
        self.devices = 0
        self.new_devices = 0
        self.rewritten = 0
        self.nonzero = np.zeros(dimensions)

    def add(self, vectors: PersonaVectors, rewritten: int) -> None:
        known = self.previous.get_indexer(vectors.device_ids)
        self.seen[known[known >= 0]] = True
        self.devices += len(vectors.device_ids)
        self.new_devices += int((known < 0).sum())
        self.rewritten += rewritten
        self.nonzero += (vectors.matrix != 0).sum(axis=0)

    def not_computed(self) -> list[str]:
        """The devices with a vector before the run that it did not compute, in id order."""
        return sorted(self.previous[~self.seen].tolist())

    def nonzero_share(self) -> np.ndarray:
        return self.nonzero / max(self.devices, 1)
