"""Proactive offers from moves, heavy app use and anomalies, ranked by what segments accept. Pure.

Each candidate has a trigger strength in (0, 1]; its score is that strength times the
acceptance rate of the service in the device's segment, smoothed toward the service's
fleet-wide rate (itself smoothed toward the prior a / (a + b)), so feedback changes the
ranking. Offers are idempotent: the
offer id is a hash of (device, service, day), so a re-run of the same day yields the
same offers. Cooldowns and a per-device daily cap are honoured.

A day's offers are decided once per (device, service, day) and never taken back; a later run
of the same day (new feedback, new weights, new segments) only adds within what is left: the
offers already stored for a device that day take their slots under the daily cap first, and a
service's lookalike offers that day, over all runs, are at most `lookalike_per_service`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_pipeline.formatting import format_values
from persona_pipeline.offers.catalog import ServiceCatalog

APP_KEY = re.compile(r"^device\.usage\.app_(?P<app>[A-Za-z0-9_-]+)_duration$")
APP_KEY_PREFIX = "device.usage.app_"  # every APP_KEY starts so
POSITIVE_RESPONSES = ("accepted", "used")
# Under the daily cap, support comes first, then a recent move, then usage, then lookalikes.
TRIGGER_PRECEDENCE = {"support": 0, "location": 1, "usage": 2, "lookalike": 3}
OFFER_COLUMNS = ["device_id", "service_id", "trigger", "strength", "priority", "reason", "cluster_id"]


@dataclass
class OfferInputs:
    day: str  # the offer day (event time of the newest update), YYYY-MM-DD
    moves: pd.DataFrame  # device_id, previous_value, value, changed_at
    app_usage: pd.DataFrame  # device_id x app -> seconds a day
    segments: pd.Series  # device_id -> cluster_id
    anomalies: pd.DataFrame  # device_id, score, is_anomaly, reason, cause
    acceptance: pd.DataFrame  # cluster_id, service_id, accepted, responses
    history: pd.DataFrame  # earlier offers: offer_id, device_id, service_id, offer_day, score, priority


def app_key(app: str) -> str:
    """The profile key of an app's daily use."""
    return f"device.usage.app_{app}_duration"


def app_usage(profiles: pd.DataFrame) -> pd.DataFrame:
    """Seconds a day per device and app, from every `device.usage.app_<name>_duration` key."""
    keys = profiles["key"].drop_duplicates()
    apps = profiles["key"].map(dict(zip(keys, keys.str.extract(APP_KEY)["app"], strict=True)))
    usage = profiles.assign(app=apps).dropna(subset=["app"])
    if usage.empty:
        return pd.DataFrame(index=pd.Index([], name="device_id"))
    return usage.pivot_table(index="device_id", columns="app", values="value_number", aggfunc="sum").fillna(
        0.0
    )


def location_candidates(inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    moves = inputs.moves
    services = catalog.services("location")
    if moves.empty or not services:
        return _empty()
    since = (
        pd.Timestamp(inputs.day, tz="UTC")
        + pd.Timedelta(days=1)
        - pd.Timedelta(days=catalog.rules.location_window_days)
    )
    recent = moves[moves["changed_at"] >= since]
    age_days = (pd.Timestamp(inputs.day, tz="UTC") + pd.Timedelta(days=1) - recent["changed_at"]).dt.days
    strength = 1.0 - 0.5 * age_days.clip(lower=0) / catalog.rules.location_window_days
    reason = (
        "moved from "
        + recent["previous_value"].astype(str)
        + " to "
        + recent["value"].astype(str)
        + " on "
        + recent["changed_at"].dt.strftime("%Y-%m-%d")
    )
    frames = []
    for service in services:
        cities = service.eligibility.cities
        eligible = recent["value"].isin(cities) if cities else pd.Series(True, index=recent.index)
        chosen = recent[eligible]
        frames.append(
            pd.DataFrame(
                {
                    "device_id": chosen["device_id"].to_numpy(),
                    "service_id": service.service_id(),
                    "trigger": "location",
                    "strength": strength[eligible].to_numpy(),
                    "priority": service.priority,
                    "reason": (
                        _titled(service.title, "{city}", chosen["value"]) + ": " + reason[eligible]
                    ).to_numpy(),
                }
            )
        )
    return _with_segments(pd.concat(frames, ignore_index=True), inputs)


def usage_candidates(inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    usage = inputs.app_usage
    services = catalog.services("usage")
    if usage.empty or not services:
        return _empty()
    rules = catalog.rules
    segment = inputs.segments.reindex(usage.index)
    medians = usage.groupby(segment.to_numpy()).median()
    typical = medians.reindex(segment.to_numpy()).to_numpy()
    threshold = np.maximum(rules.usage_ratio * typical, rules.usage_min_seconds)
    heavy = usage.to_numpy() >= threshold
    rows, columns = np.nonzero(heavy)
    seconds = usage.to_numpy()[rows, columns]
    found = pd.DataFrame(
        {
            "device_id": usage.index.to_numpy()[rows],
            "app": usage.columns.to_numpy()[columns],
            "seconds": seconds,
            "typical": typical[rows, columns],
            "strength": np.clip(0.5 + 0.5 * np.log(seconds / threshold[rows, columns]) / np.log(4), 0.1, 1.0),
            "cluster_id": segment.to_numpy()[rows],
        }
    )
    if found.empty:
        return _empty()
    said = (
        found["app"]
        + " use "
        + format_values(found["seconds"], "seconds").to_numpy()
        + " a day vs "
        + format_values(found["typical"], "seconds").to_numpy()
        + " typical in segment "
        + found["cluster_id"].astype("Int64").astype(str)
    )
    frames = []
    for service in services:
        allowed = service.eligibility.apps
        chosen = found[found["app"].isin(allowed)] if allowed else found
        if chosen.empty:
            continue
        templated = service.id.endswith(":{app}")
        service_ids = (
            service.id.replace("{app}", "") + chosen["app"]
            if templated
            else pd.Series(service.id, index=chosen.index)
        )
        titled = _titled(service.title, "{app}", chosen["app"])
        frames.append(
            pd.DataFrame(
                {
                    "device_id": chosen["device_id"].to_numpy(),
                    "service_id": service_ids.to_numpy(),
                    "trigger": "usage",
                    "strength": chosen["strength"].to_numpy(),
                    "priority": service.priority,
                    "reason": (titled + ": " + said[chosen.index]).to_numpy(),
                    "cluster_id": chosen["cluster_id"].to_numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else _empty()


def support_candidates(inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    flagged = inputs.anomalies[inputs.anomalies["is_anomaly"].astype(bool)]
    frames = []
    for service in catalog.services("support"):
        minimum = service.eligibility.min_anomaly_score or 0.0
        chosen = flagged[flagged["score"] >= minimum]
        frames.append(
            pd.DataFrame(
                {
                    "device_id": chosen["device_id"].to_numpy(),
                    "service_id": service.service_id(),
                    "trigger": "support",
                    "strength": chosen["score"].to_numpy(),
                    "priority": service.priority,
                    "reason": (
                        service.title + ": " + chosen["reason"].fillna("flagged as an anomaly")
                    ).to_numpy(),
                }
            )
        )
    if not frames:
        return _empty()
    return _with_segments(pd.concat(frames, ignore_index=True), inputs)


def support_tickets(anomalies: pd.DataFrame, catalog: ServiceCatalog, day: str) -> pd.DataFrame:
    """One ticket per device and cause above the severity threshold; the id is a hash of both,
    so the outbox never holds two open tickets for the same device and cause."""
    if not any(s.opens_ticket for s in catalog.services("support")):
        return pd.DataFrame(columns=["ticket_id", "device_id", "severity", "cause", "reason", "opened_day"])
    severe = anomalies[
        anomalies["is_anomaly"].astype(bool) & (anomalies["score"] >= catalog.rules.ticket_severity)
    ]
    cause = severe["cause"].fillna("segment_distance")
    return pd.DataFrame(
        {
            "ticket_id": "ticket-" + _hash_hex(pd.DataFrame({"d": severe["device_id"], "c": cause})),
            "device_id": severe["device_id"].to_numpy(),
            "severity": severe["score"].to_numpy(),
            "cause": cause.to_numpy(),
            "reason": severe["reason"].to_numpy(),
            "opened_day": day,
        }
    )


def smoothed_acceptance(
    candidates: pd.DataFrame, acceptance: pd.DataFrame, catalog: ServiceCatalog
) -> np.ndarray:
    """Each candidate's segment's acceptance rate of its service, shrunk toward the service's
    rate over the whole fleet, which is itself shrunk toward the configured prior. What the
    fleet taught about a service survives when segments are re-formed in a new space."""
    prior_yes, prior_no = catalog.rules.prior_accepted, catalog.rules.prior_rejected
    strength = prior_yes + prior_no
    fleet = acceptance.groupby("service_id")[["accepted", "responses"]].sum()
    fleet_rate = ((fleet["accepted"] + prior_yes) / (fleet["responses"] + strength)).reindex(
        candidates["service_id"]
    )
    fleet_rate = fleet_rate.fillna(prior_yes / strength).to_numpy()
    keyed = acceptance.set_index(["cluster_id", "service_id"])
    index = pd.MultiIndex.from_arrays([candidates["cluster_id"].astype("Int64"), candidates["service_id"]])
    accepted = keyed["accepted"].reindex(index).fillna(0.0).to_numpy()
    responses = keyed["responses"].reindex(index).fillna(0.0).to_numpy()
    return (accepted + strength * fleet_rate) / (responses + strength)


def lookalike_candidates(hits: pd.DataFrame, inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    """Offers for the devices Qdrant found nearest to those that accepted a service.
    `hits`: service_id, device_id, rank (0 = nearest), accepters (how many examples). Only the
    nearest devices not offered the service today are taken, as many as the service has left of
    its lookalikes for the day."""
    if hits.empty:
        return _empty()
    limit = max(catalog.rules.lookalike_per_service, 1)
    hits = _lookalikes_left_today(hits, inputs, limit)
    frame = pd.DataFrame(
        {
            "device_id": hits["device_id"].to_numpy(),
            "service_id": hits["service_id"].to_numpy(),
            "trigger": "lookalike",
            "strength": (1.0 - 0.5 * hits["rank"] / limit).to_numpy(),
            "priority": catalog.per_service(hits["service_id"], "priority", 0.3).to_numpy(),
            "reason": (
                "close in persona to the "
                + hits["accepters"].astype(str)
                + " devices that accepted "
                + hits["service_id"]
            ).to_numpy(),
        }
    )
    return _with_segments(frame, inputs)


def _lookalikes_left_today(hits: pd.DataFrame, inputs: OfferInputs, limit: int) -> pd.DataFrame:
    """The hits that are new today, nearest first, at most `limit` less the lookalike offers
    each service already has for the day (from earlier runs)."""
    today = inputs.history[inputs.history["offer_day"] == inputs.day]
    offered_today = pd.MultiIndex.from_frame(today[["device_id", "service_id"]].astype(str))
    found = pd.MultiIndex.from_frame(hits[["device_id", "service_id"]].astype(str))
    fresh = hits[~found.isin(offered_today)].sort_values(["service_id", "rank"], kind="stable")
    made = today.loc[today["trigger"] == "lookalike", "service_id"].value_counts()
    left = limit - made.reindex(fresh["service_id"]).fillna(0).to_numpy()
    return fresh[fresh.groupby("service_id").cumcount().to_numpy() < left]


def recommend(
    inputs: OfferInputs, catalog: ServiceCatalog, lookalikes: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Today's new offers: offer_id, device_id, service_id, trigger, score, reason, cluster_id,
    priority, offer_day (cooldowns and the daily cap applied). `lookalikes`: Qdrant's hits, see
    `lookalike_candidates`."""
    candidates = pd.concat(
        [
            location_candidates(inputs, catalog),
            usage_candidates(inputs, catalog),
            support_candidates(inputs, catalog),
            lookalike_candidates(lookalikes if lookalikes is not None else pd.DataFrame(), inputs, catalog),
        ],
        ignore_index=True,
    )
    return finalize(candidates, inputs, catalog)


def finalize(candidates: pd.DataFrame, inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    """Score, drop what is cooling down, keep each device's best offers under the daily cap."""
    if candidates.empty:
        return _empty().assign(offer_id=[], score=[], offer_day=[])
    candidates = candidates.drop_duplicates(["device_id", "service_id"]).reset_index(drop=True)
    candidates["score"] = candidates["strength"] * smoothed_acceptance(candidates, inputs.acceptance, catalog)
    candidates = candidates[candidates["score"] >= catalog.rules.min_score].reset_index(drop=True)
    candidates["offer_day"] = inputs.day
    candidates["offer_id"] = "offer-" + _hash_hex(candidates[["device_id", "service_id", "offer_day"]])

    history = inputs.history
    earlier = history[history["offer_day"] < inputs.day]
    last = earlier.groupby(["device_id", "service_id"])["offer_day"].max()
    previous_day = last.reindex(pd.MultiIndex.from_frame(candidates[["device_id", "service_id"]])).to_numpy()
    days_since = (pd.Timestamp(inputs.day) - pd.to_datetime(pd.Series(previous_day))).dt.days.to_numpy()
    cooling = pd.notna(previous_day) & (
        days_since < catalog.per_service(candidates["service_id"], "cooldown_days", 0).to_numpy()
    )
    candidates = candidates[~cooling]

    today = history[history["offer_day"] == inputs.day]
    kept = under_daily_cap(candidates, today, catalog.rules.daily_cap)
    return kept.drop(columns=["strength"]).reset_index(drop=True)


def under_daily_cap(offers: pd.DataFrame, stored_today: pd.DataFrame, daily_cap: int) -> pd.DataFrame:
    """The offers not stored yet that fit under each device's daily cap, the cap counting the
    offers `stored_today` holds for the device (whatever their rank: an offer made is not taken
    back). The slots left go by trigger precedence, then score x priority, then offer id."""
    new = offers[~offers["offer_id"].isin(stored_today["offer_id"])]
    left = daily_cap - stored_today["device_id"].value_counts().reindex(new["device_id"]).fillna(0).to_numpy()
    order = pd.DataFrame(
        {
            "device_id": new["device_id"].to_numpy(),
            "precedence": new["trigger"].map(TRIGGER_PRECEDENCE).to_numpy(),
            "rank_key": (new["score"] * new["priority"]).to_numpy(),
            "offer_id": new["offer_id"].to_numpy(),
            "left": left,
        }
    ).sort_values(["device_id", "precedence", "rank_key", "offer_id"], ascending=[True, True, False, True])
    fitting = order.index[order.groupby("device_id").cumcount().to_numpy() < order["left"].to_numpy()]
    return new.iloc[fitting.to_numpy()]


def _titled(title: str, placeholder: str, values: pd.Series) -> pd.Series:
    """The title per row with `placeholder` filled from `values`."""
    if placeholder not in title:
        return pd.Series(title, index=values.index)
    head, tail = title.split(placeholder, 1)
    return head + values.astype(str) + tail


def _with_segments(frame: pd.DataFrame, inputs: OfferInputs) -> pd.DataFrame:
    return frame.assign(cluster_id=inputs.segments.reindex(frame["device_id"]).to_numpy())


def _empty() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in OFFER_COLUMNS})


def _hash_hex(frame: pd.DataFrame) -> pd.Series:
    hashes = pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy()
    # 16 hex digits per row, formatted for the whole column at once.
    digits = np.frombuffer(hashes.astype(">u8").tobytes().hex().encode(), dtype="S16").astype(str)
    return pd.Series(digits, index=frame.index)
