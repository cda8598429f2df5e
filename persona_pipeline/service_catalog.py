"""The service catalog: which services can be offered, on which trigger, to whom. Pure.

Loaded from `service_catalog.yaml` (shipped default, or `PERSONA_CONFIG_DIR`).
"""

from __future__ import annotations

import os
import re
from typing import Literal, get_args

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from persona_pipeline.config_files import load_validated

SERVICE_CATALOG_FILE = "service_catalog.yaml"
Trigger = Literal["location", "usage", "support", "lookalike"]
TRIGGERS: tuple[str, ...] = get_args(Trigger)  # in the order offers, the demo and the evaluation list them
SERVICE_ID = re.compile(r"^[a-z0-9_]+(:\{app\})?$")
# Bounds of the numbers: a cooldown or window beyond ten years overflows date arithmetic
# (cooldown_days: 1e12 was an OverflowError at run time).
MAX_DAYS = 3_650
MAX_DAY_SECONDS = 24 * 3600


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf`, `.nan` and numbers that overflow float64 are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Eligibility(_Strict):
    apps: tuple[str, ...] | None = Field(
        default=None, description="usage: only these apps (the name in device.usage.app_<name>_duration)."
    )
    cities: tuple[str, ...] | None = Field(default=None, description="location: only moves to these cities.")
    min_anomaly_score: float | None = Field(
        default=None, ge=0, le=1, description="support: only devices scoring at least this."
    )

    @field_validator("apps", "cities")
    @classmethod
    def _listed_once(cls, values: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if values is not None:
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{', '.join(map(repr, repeated))} given more than once")
            if any(not v.strip() for v in values):
                raise ValueError("an empty name")
        return values


class Service(_Strict):
    id: str
    trigger: Trigger
    title: str = Field(min_length=1, description="What the person is offered ({app}, {city} filled in).")
    eligibility: Eligibility = Eligibility()
    cooldown_days: int = Field(
        ge=0, le=MAX_DAYS, description="Days before the same service is offered to a device again."
    )
    priority: float = Field(gt=0, le=1, description="Breaks ties between offers under the daily cap.")
    opens_ticket: bool = Field(default=False, description="support: also open a support ticket.")
    value: float = Field(
        default=1.0,
        gt=0,
        le=1_000,
        description="What an accepted offer is worth (expected value = acceptance x value x priority).",
    )
    daily_capacity: int | None = Field(
        default=None,
        ge=0,
        le=100_000_000,
        description="Offers of this service a day over the fleet at most (callbacks a day); none: no limit.",
    )

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not SERVICE_ID.match(value):
            raise ValueError(
                f"id {value!r} must be lower-case letters, digits and '_' (usage templates end in ':{{app}}')"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Service:
        templated = self.id.endswith(":{app}")
        if templated and self.trigger != "usage":
            raise ValueError("only usage services can be templates over the app (':{app}')")
        if self.eligibility.apps is not None and self.trigger != "usage":
            raise ValueError("eligibility.apps applies to usage services only")
        if self.eligibility.cities is not None and self.trigger != "location":
            raise ValueError("eligibility.cities applies to location services only")
        if self.eligibility.min_anomaly_score is not None and self.trigger != "support":
            raise ValueError("eligibility.min_anomaly_score applies to support services only")
        if self.opens_ticket and self.trigger != "support":
            raise ValueError("opens_ticket applies to support services only")
        if self.trigger == "usage" and not templated and not self.eligibility.apps:
            raise ValueError("a usage service names its apps (eligibility.apps) or is a ':{app}' template")
        return self

    def service_id(self, app: str | None = None) -> str:
        return self.id.replace("{app}", app) if app else self.id


class OfferRules(_Strict):
    location_window_days: int = Field(
        default=7, ge=1, le=MAX_DAYS, description="A city change this recent offers."
    )
    usage_ratio: float = Field(default=2.25, gt=1, le=1_000, description="Heavy: this times segment median.")
    usage_min_seconds: float = Field(
        default=300, ge=0, le=MAX_DAY_SECONDS, description="Heavy: at least these seconds."
    )
    min_score: float = Field(
        default=0.1, ge=0, le=1, description="Offers scoring below this are not made (strength x acceptance)."
    )
    daily_cap: int = Field(default=3, ge=1, le=100, description="Offers per device per day at most.")
    max_offers_per_week: int = Field(
        default=2, ge=1, le=700, description="Offers per device over any 7 days in a row at most."
    )
    max_offers_per_device_day: float | None = Field(
        default=0.3,
        gt=0,
        le=100,
        description="Offers on one day across the fleet at most this times the devices in the fleet "
        "(rounded up), whole devices at a time: those with a health fault first, then by their best "
        "candidate's expected value; the rest wait for a later day. None: no fleet budget.",
    )
    exploration_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Share of device-days whose offers are drawn uniformly among the eligible services.",
    )
    usage_peer_groups: int = Field(
        default=8,
        ge=1,
        le=1_000,
        description="Heavy use is judged against the device's usage peers: groups of the raw app use.",
    )
    usage_min_peers: int = Field(
        default=50, ge=1, le=1_000_000, description="Devices per usage peer group at least (fewer groups)."
    )
    usage_min_peer_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="A usage peer group with less of the fleet joins the nearest larger one.",
    )
    ticket_resolve_days: int = Field(
        default=2,
        ge=1,
        le=MAX_DAYS,
        description="An open ticket is resolved after this many days without its fault.",
    )
    ticket_severity: float = Field(
        default=0.0, ge=0, le=1, description="A health flag opens a ticket at this anomaly score or above."
    )
    prior_accepted: float = Field(
        default=1.0, gt=0, le=1e6, description="Pseudo-acceptances of the smoothed rate."
    )
    prior_rejected: float = Field(
        default=1.0, gt=0, le=1e6, description="Pseudo-rejections of the smoothed rate."
    )
    lookalike_min_responses: int = Field(
        default=5, ge=1, le=1_000_000, description="Responses before lookalikes."
    )
    lookalike_per_service: int = Field(
        default=20, ge=1, le=1_000_000, description="Lookalike offers per service a day."
    )


class ServiceCatalogFile(_Strict):
    rules: OfferRules = OfferRules()
    services: tuple[Service, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ServiceCatalogFile:
        seen: set[str] = set()
        for service in self.services:
            if service.id in seen:
                raise ValueError(f"service {service.id!r} is listed twice")
            seen.add(service.id)
        return self


class ServiceCatalog:
    def __init__(self, spec: ServiceCatalogFile, origin: str) -> None:
        self.spec = spec
        self.origin = origin

    @property
    def rules(self) -> OfferRules:
        return self.spec.rules

    def services(self, trigger: str) -> list[Service]:
        return [s for s in self.spec.services if s.trigger == trigger]

    def service_for(self, service_id: str) -> Service | None:
        """The catalog entry behind an offer's service id (`app_tutorial:maps` -> `app_tutorial:{app}`)."""
        template = service_id.split(":", 1)[0] + ":{app}"
        by_id = {s.id: s for s in self.spec.services}
        return by_id.get(service_id) or by_id.get(template)

    def app_of(self, service_id: str) -> str | None:
        """The app a usage service is about: a template's app, else the first app it is for."""
        service = self.service_for(service_id)
        if service is None or service.trigger != "usage":
            return None
        if ":" in service_id:
            return service_id.split(":", 1)[1]
        return service.eligibility.apps[0] if service.eligibility.apps else None

    def per_service(self, service_ids: pd.Series, field: str, default: float) -> pd.Series:
        """`field` of each offer's service (looked up once per distinct id, then taken by code: a
        dictionary map over a fleet's offers costs seconds), `default` if unknown."""
        codes, distinct = pd.factorize(service_ids, use_na_sentinel=False)
        found = pd.Series([getattr(self.service_for(sid), field, default) for sid in distinct])
        return pd.Series(found.to_numpy()[codes], index=service_ids.index, name=service_ids.name)


def load_service_catalog(config_dir: str | os.PathLike | None = None) -> ServiceCatalog:
    spec, path = load_validated(SERVICE_CATALOG_FILE, ServiceCatalogFile, config_dir)
    return ServiceCatalog(spec, origin=str(path))
