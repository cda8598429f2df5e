"""The feature schema: keys (or key patterns) -> type, transform and initial weight.

Loaded from `feature_schema.yaml` (shipped default, or `PERSONA_CONFIG_DIR`).
Pure: no Dagster imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from persona_pipeline.config_files import load_validated

FEATURE_SCHEMA_FILE = "feature_schema.yaml"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_*-]+(\.[A-Za-z0-9_*-]+)+$")
OTHER = "<other>"
# Bounds of every number in the file: beyond them a weight or clip range overflows float64 on the
# way to a vector (1e308 - -1e308 is inf), and a window of days overflows a timestamp.
MAX_WEIGHT = 1_000.0
MAX_RAW_MAGNITUDE = 1e15
MAX_DAYS = 3_650
PATTERN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

KeyType = Literal["numeric", "categorical", "boolean"]
# What a deviation in a key means: `health` a fault (crashes, signal, battery drain), `behaviour` how
# the device is used (app use, a move), `context` what the device is (city, model, settings).
# Anomaly flags carry the role of the keys that drove them; only health flags become support work.
Role = Literal["health", "behaviour", "context"]
ROLES: tuple[Role, ...] = ("health", "behaviour", "context")
DEFAULT_ROLE: Role = "context"  # an entry without a role: never a fault, never a need


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf`, `.nan` and numbers that overflow float64 (1e309) are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Transform(_Strict):
    clip: tuple[
        Annotated[float, Field(ge=-MAX_RAW_MAGNITUDE, le=MAX_RAW_MAGNITUDE)],
        Annotated[float, Field(ge=-MAX_RAW_MAGNITUDE, le=MAX_RAW_MAGNITUDE)],
    ] = Field(description="Lower and upper bound in the key's unit.")
    log1p: bool = False

    @field_validator("clip")
    @classmethod
    def _ordered(cls, clip: tuple[float, float]) -> tuple[float, float]:
        low, high = clip
        if not (np.isfinite(low) and np.isfinite(high)) or low >= high:
            raise ValueError(f"clip must be two finite numbers, low < high; got {list(clip)}")
        return clip

    @model_validator(mode="after")
    def _log_needs_non_negative(self) -> Transform:
        if self.log1p and self.clip[0] < 0:
            raise ValueError("log1p needs a clip range that starts at 0 or above")
        return self

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Clip, optionally log1p, then scale to [0, 1] by the transformed bounds."""
        low, high = self.clip
        clipped = np.clip(values, low, high)
        if self.log1p:
            clipped, low, high = np.log1p(clipped), np.log1p(low), np.log1p(high)
        return (clipped - low) / (high - low)


# Presentation and meaning only: how reasons and segment profiles name a key and show its values,
# and what a deviation in it means. Not part of the schema version (they do not change the vector
# space, so stored vectors stay valid).
PRESENTATION_FIELDS = ("label", "unit", "role")


class Feature(_Strict):
    key: str
    type: KeyType
    weight: float = Field(ge=0, le=MAX_WEIGHT)
    label: str | None = Field(default=None, description="Short name in reasons; '*' stands for the match.")
    unit: str | None = Field(default=None, description="Unit of the raw value; 'seconds' is shown as min/h.")
    role: Role = Field(
        default=DEFAULT_ROLE,
        description="health (a fault), behaviour (how the device is used) or context (what it is).",
    )
    transform: Transform | None = None
    fill: float | None = Field(default=None, ge=-MAX_RAW_MAGNITUDE, le=MAX_RAW_MAGNITUDE)
    vocabulary: tuple[str, ...] | None = None
    expand: tuple[str, ...] | None = None

    @field_validator("key")
    @classmethod
    def _dotted(cls, key: str) -> str:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"key {key!r} is not a dotted key (like device.location.city)")
        if key.count("*") > 1:
            raise ValueError(f"key {key!r} has more than one '*'")
        return key

    @model_validator(mode="after")
    def _consistent(self) -> Feature:
        if self.type == "numeric" and self.transform is None:
            raise ValueError("a numeric feature needs a transform with a clip range")
        if self.type != "numeric" and (self.transform or self.fill is not None):
            raise ValueError(f"transform and fill apply to numeric features, not {self.type}")
        if self.type == "categorical" and not self.vocabulary:
            raise ValueError("a categorical feature needs a non-empty vocabulary")
        if self.type != "categorical" and self.vocabulary:
            raise ValueError("vocabulary applies to categorical features only")
        if self.vocabulary:
            _refuse_repeats("vocabulary", self.vocabulary)
            if OTHER in self.vocabulary or "" in self.vocabulary:
                raise ValueError(
                    f"vocabulary may not hold {OTHER!r} (every feature has it) or an empty value"
                )
        if self.expand is not None and not self.is_pattern:
            raise ValueError("expand applies to key patterns (with '*') only")
        if self.expand:
            _refuse_repeats("expand", self.expand)
            bad = next((name for name in self.expand if not PATTERN_NAME.match(name)), None)
            if bad is not None:
                raise ValueError(f"expand name {bad!r} is not what '*' matches (letters, digits, '_', '-')")
        if self.is_pattern and self.type != "numeric":
            raise ValueError("key patterns are supported for numeric features only")
        return self

    @property
    def is_pattern(self) -> bool:
        return "*" in self.key

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.key).replace(r"\*", "([A-Za-z0-9_-]+)") + "$")

    def concrete_key(self, name: str) -> str:
        return self.key.replace("*", name)


class Derived(_Strict):
    name: str
    kind: Literal["changed_within_days", "sum"]
    key: str
    weight: float = Field(ge=0, le=MAX_WEIGHT)
    label: str | None = None
    unit: str | None = None
    role: Role = DEFAULT_ROLE
    days: int | None = Field(default=None, ge=1, le=MAX_DAYS)
    transform: Transform | None = None

    @field_validator("name")
    @classmethod
    def _prefixed(cls, name: str) -> str:
        if not name.startswith("derived.") or not KEY_PATTERN.match(name):
            raise ValueError(f"name {name!r} must be dotted and start with 'derived.'")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Derived:
        if self.kind == "changed_within_days" and self.days is None:
            raise ValueError("changed_within_days needs days")
        if self.kind == "changed_within_days" and self.role == "health":
            raise ValueError("a change of a key (changed_within_days) is behaviour or context, never health")
        if self.kind == "sum" and self.transform is None:
            raise ValueError("sum needs a transform with a clip range")
        return self


class Limits(_Strict):
    max_device_id_length: int = Field(default=128, ge=1, le=4_096)
    max_key_length: int = Field(default=200, ge=1, le=4_096)
    max_value_length: int = Field(default=256, ge=1, le=1_000_000)
    max_future_skew_hours: float = Field(default=24, ge=0, le=24 * 365)


class FeatureSchemaFile(_Strict):
    limits: Limits = Limits()
    features: tuple[Feature, ...] = Field(min_length=1)
    derived: tuple[Derived, ...] = ()

    @model_validator(mode="after")
    def _unique_and_resolvable(self) -> FeatureSchemaFile:
        seen: set[str] = set()
        for entry in (*self.features, *self.derived):
            name = entry.key if isinstance(entry, Feature) else entry.name
            if name in seen:
                raise ValueError(f"{name!r} is listed twice")
            seen.add(name)
        feature_keys = {feature.key: feature for feature in self.features}
        for derived in self.derived:
            source = feature_keys.get(derived.key)
            if source is None:
                raise ValueError(f"derived {derived.name!r} refers to {derived.key!r}, not a feature")
            if derived.kind == "sum" and source.type != "numeric":
                raise ValueError(f"derived {derived.name!r} sums {derived.key!r}, not numeric")
        names = FeatureSchema(self, origin="").dimension_names
        _refuse_repeats("dimension names (an expanded key that is also a feature?)", names)
        return self


def _refuse_repeats(what: str, values: Sequence[str]) -> None:
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{what}: {', '.join(map(repr, repeated))} given more than once")


@dataclass(frozen=True)
class Dimension:
    """One coordinate of a persona vector."""

    name: str
    weight_key: str
    concrete_key: str | None = None


class FeatureSchema:
    """A validated feature schema and what follows from it: key types, dimensions, version."""

    def __init__(self, spec: FeatureSchemaFile, origin: str) -> None:
        self.spec = spec
        self.origin = origin
        self._exact = {f.key: f for f in spec.features if not f.is_pattern}
        self._patterns = [f for f in spec.features if f.is_pattern]

    @property
    def limits(self) -> Limits:
        return self.spec.limits

    @property
    def features(self) -> tuple[Feature, ...]:
        return self.spec.features

    @property
    def derived(self) -> tuple[Derived, ...]:
        return self.spec.derived

    def feature_for(self, key: str) -> Feature | None:
        found = self._exact.get(key)
        if found is not None:
            return found
        return next((f for f in self._patterns if f.regex.match(key)), None)

    def key_types(self, keys: list[str]) -> dict[str, str | None]:
        """Type per key (None for keys the schema does not know). Call on unique keys."""
        return {key: (f.type if (f := self.feature_for(key)) else None) for key in keys}

    @cached_property
    def dimensions(self) -> tuple[Dimension, ...]:
        dims: list[Dimension] = []
        for feature in self.features:
            if feature.type == "categorical":
                for value in (*(feature.vocabulary or ()), OTHER):
                    dims.append(Dimension(f"{feature.key}={value}", feature.key))
            elif feature.is_pattern:
                for name in feature.expand or ():
                    concrete = feature.concrete_key(name)
                    dims.append(Dimension(concrete, feature.key, concrete))
                dims.append(Dimension(f"{feature.key}[{OTHER}]", feature.key))
            else:
                dims.append(Dimension(feature.key, feature.key))
        dims.extend(Dimension(d.name, d.name) for d in self.derived)
        return tuple(dims)

    def dimension_of_key(self, key: str) -> int | None:
        """The dimension a numeric key feeds: its own, or its pattern's `[<other>]` dimension."""
        names = self.dimension_names
        if key in names:
            return names.index(key)
        feature = self.feature_for(key)
        if feature is not None and feature.is_pattern and f"{feature.key}[{OTHER}]" in names:
            return names.index(f"{feature.key}[{OTHER}]")
        return None

    @property
    def dimension_names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    @cached_property
    def version(self) -> str:
        """Hash of everything that shapes the vector space except the weights."""
        shape = self.spec.model_dump(mode="json", exclude={"limits"})
        for entry in (*shape["features"], *shape["derived"]):
            for field in ("weight", *PRESENTATION_FIELDS):
                entry.pop(field)
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
        return digest[:10]

    def _entry_for(self, name: str) -> Feature | Derived | None:
        """The schema entry behind a key or dimension name (incl. a pattern's `[<other>]`)."""
        derived = next((d for d in self.derived if d.name == name), None)
        if derived is not None:
            return derived
        if name.endswith(f"[{OTHER}]"):
            base = name.removesuffix(f"[{OTHER}]")
            return next((f for f in self.features if f.key == base), None)
        return self.feature_for(name)

    def label_for(self, name: str) -> str:
        """How a person reads a key or dimension: its entry's label ('*' replaced by the
        matched name, or 'other'), else the name without its `device.` prefix."""
        entry = self._entry_for(name)
        if entry is None or entry.label is None:
            return name.removeprefix("device.").removeprefix("derived.")
        if isinstance(entry, Feature) and entry.is_pattern:
            match = entry.regex.match(name)
            return entry.label.replace("*", match.group(1) if match else "other")
        return entry.label

    def unit_for(self, name: str) -> str | None:
        entry = self._entry_for(name)
        return entry.unit if entry else None

    def role_for(self, name: str) -> Role:
        """The role of a key or dimension name (`context` for a name the schema does not list)."""
        entry = self._entry_for(name)
        if entry is None and "=" in name:  # a categorical dimension: `key=value`
            entry = self._entry_for(name.split("=", 1)[0])
        return entry.role if entry else DEFAULT_ROLE

    @cached_property
    def dimension_roles(self) -> np.ndarray:
        """The role of each dimension (as strings, in dimension order)."""
        roles = {f.key: f.role for f in self.features} | {d.name: d.role for d in self.derived}
        return np.array([roles[d.weight_key] for d in self.dimensions], dtype=object)

    def initial_weights(self) -> dict[str, float]:
        weights = {f.key: f.weight for f in self.features}
        weights.update({d.name: d.weight for d in self.derived})
        return weights

    def dimension_weights(self, weights: dict[str, float]) -> np.ndarray:
        """Weight per dimension: a concrete key's own weight if learned, else its entry's."""
        merged = {**self.initial_weights(), **weights}
        return np.array(
            [merged.get(d.concrete_key or "", merged[d.weight_key]) for d in self.dimensions],
            dtype=np.float64,
        )


def load_feature_schema(config_dir: str | os.PathLike | None = None) -> FeatureSchema:
    spec, path = load_validated(FEATURE_SCHEMA_FILE, FeatureSchemaFile, config_dir)
    return FeatureSchema(spec, origin=str(path))
