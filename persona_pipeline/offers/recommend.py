"""Proactive offers from moves, heavy app use and anomalies, ranked by what segments accept. Pure.

Each candidate has a trigger strength in (0, 1]; its score is that strength times the
acceptance rate of the service in the device's segment, smoothed toward the service's
fleet-wide rate (itself smoothed toward the prior a / (a + b)), so feedback changes the
ranking. Offers are idempotent: the
offer id is a hash of (device, service, day), so a re-run of the same day yields the
same offers. Cooldowns (from the last offer of the service, or its rejection), a per-device
daily cap, a per-device budget over any 7 days in a row and a per-service daily capacity are
honoured; the offers that fit are chosen by expected value (acceptance x value x priority), and
a small share of device-days explores: its offers are drawn uniformly among the eligible
services. Every offer records `propensity`, the probability with which it was chosen.

Support offers and tickets come only from health faults: a flag whose kind is `health` (or
NULL, before flags had kinds). A behaviour change (a move, a surge in an app) is served by the
location and usage triggers, never by support.

A day's offers are decided once per (device, service, day) and never taken back; a later run
of the same day (new feedback, new weights, new segments) only adds within what is left: the
offers already stored for a device that day take their slots under the daily cap first, and a
service's lookalike offers that day, over all runs, are at most `lookalike_per_service`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from persona_pipeline.formatting import format_values
from persona_pipeline.service_catalog import ServiceCatalog

APP_KEY = re.compile(r"^device\.usage\.app_(?P<app>[A-Za-z0-9_-]+)_duration$")
APP_KEY_PREFIX = "device.usage.app_"  # every APP_KEY starts so
POSITIVE_RESPONSES = ("accepted", "used")
OFFER_COLUMNS = ["device_id", "service_id", "trigger", "strength", "priority", "reason", "cluster_id"]
HEALTH = "health"  # the anomaly kind that is a fault; a flag without a kind counts as one
WEEK_DAYS = 7
SUPPORT_FIRST = 1e6  # added to a device's priority for the fleet's budget when it has a health fault
TICKET_COLUMNS = ["ticket_id", "device_id", "severity", "cause", "reason", "status", "last_seen_day"]


@dataclass
class OfferInputs:
    day: str  # the offer day (event time of the newest update), YYYY-MM-DD
    moves: pd.DataFrame  # device_id, previous_value, value, changed_at
    app_usage: pd.DataFrame  # device_id x app -> seconds a day
    segments: pd.Series  # device_id -> cluster_id
    anomalies: pd.DataFrame  # device_id, score, is_anomaly, reason, cause
    acceptance: pd.DataFrame  # cluster_id, service_id, accepted, responses
    # Offers from 6 days before `day` on (what the daily cap, the weekly budget, the capacities
    # and the lookalikes' daily limit count): offer_id, device_id, service_id, offer_day, …
    # `recommend` also counts the cooldowns from it and `rejections` (the offers step reads
    # them from the store instead: `last_contacts`).
    history: pd.DataFrame
    # The latest answer was a rejection: device_id, service_id, rejected_day (YYYY-MM-DD).
    rejections: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["device_id", "service_id", "rejected_day"])
    )


def app_key(app: str) -> str:
    """The profile key of an app's daily use."""
    return f"device.usage.app_{app}_duration"


def app_usage(profiles: pd.DataFrame) -> pd.DataFrame:
    """Seconds a day per device and app, from every `device.usage.app_<name>_duration` key:
    devices and apps in order, 0 where a device does not report an app."""
    keys = profiles["key"].drop_duplicates()
    apps = profiles["key"].map(dict(zip(keys, keys.str.extract(APP_KEY)["app"], strict=True)))
    usage = profiles.assign(app=apps).dropna(subset=["app"])
    if usage.empty:
        return pd.DataFrame(index=pd.Index([], name="device_id"))
    device_codes, devices = pd.factorize(usage["device_id"], sort=True)
    app_codes, app_names = pd.factorize(usage["app"], sort=True)
    seconds = np.zeros((len(devices), len(app_names)))
    # A value that is not a number adds nothing, as a sum skips it.
    np.add.at(seconds, (device_codes, app_codes), np.nan_to_num(usage["value_number"].to_numpy(dtype=float)))
    return pd.DataFrame(
        seconds,
        index=pd.Index(devices, name="device_id"),
        columns=pd.Index(app_names, name="app"),
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


def usage_typical(usage: pd.DataFrame, groups: int, min_peers: int, min_share: float) -> np.ndarray:
    """Per device and app, the median use of the app among the device's usage peers that use
    it at all (a podcast user is compared with other podcast users, not with the zeros of
    those who have none). Peers: the devices that use the apps most devices use alike
    (k-means with a fixed seed over log(1 + minutes a day), fitted on at most 10,000 devices;
    an app that most devices never use would split the fleet into its users and the rest,
    so it does not define peers). The space is the raw use from the profiles, so it does not
    move with the learned key weights: a new weights version cannot change who counts as a
    heavy user. At most `groups` groups and `min_peers` devices a group on average (a small
    fleet is one group); a group with less than `min_share` of the fleet joins the nearest
    larger one, so the heavy users of an app never become one another's peers."""
    values = usage.to_numpy(dtype=float)
    used = usage.where(usage > 0)
    k = max(1, min(groups, len(usage) // max(min_peers, 1)))
    common = (values > 0).mean(axis=0) >= 0.5
    peers = np.zeros(len(usage), dtype=int)
    if k > 1 and common.any():
        from sklearn.cluster import KMeans

        points = np.log1p(values[:, common].clip(min=0) / 60.0)
        size = min(len(points), 10_000)
        fit_on = np.sort(np.random.default_rng(0).choice(len(points), size=size, replace=False))
        model = KMeans(n_clusters=k, n_init=3, random_state=0).fit(points[fit_on])
        peers = model.predict(points)
        sizes = np.bincount(peers, minlength=k)
        large = np.flatnonzero(sizes >= min_share * len(points))
        if large.size == 0:
            large = np.array([int(sizes.argmax())])
        small = ~np.isin(peers, large)
        if small.any():
            centres = model.cluster_centers_[large]
            distance = ((points[small, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
            peers[small] = large[distance.argmin(axis=1)]
    typical = used.groupby(peers).median().reindex(peers)
    return typical.fillna(used.median()).fillna(0.0).to_numpy()


def usage_candidates(inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    usage = inputs.app_usage
    services = catalog.services("usage")
    if usage.empty or not services:
        return _empty()
    rules = catalog.rules
    segment = inputs.segments.reindex(usage.index)
    typical = usage_typical(usage, rules.usage_peer_groups, rules.usage_min_peers, rules.usage_min_peer_share)
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
    frames = []
    for number, service in enumerate(services):
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
        frames.append(
            pd.DataFrame(
                {
                    "device_id": chosen["device_id"].to_numpy(),
                    "service_id": service_ids.to_numpy(),
                    "trigger": "usage",
                    "strength": chosen["strength"].to_numpy(),
                    "priority": service.priority,
                    "reason": None,
                    "cluster_id": chosen["cluster_id"].to_numpy(),
                    "usage_service": number,
                    "usage_app": chosen["app"].to_numpy(),
                    "usage_seconds": chosen["seconds"].to_numpy(),
                    "usage_typical": chosen["typical"].to_numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else _empty()


# What usage_candidates keeps of each candidate to word its reason once it is chosen: most
# candidates are not, and wording every one cost more than choosing among them.
USAGE_EVIDENCE = ["usage_service", "usage_app", "usage_seconds", "usage_typical"]


def usage_reasons(offers: pd.DataFrame, catalog: ServiceCatalog) -> pd.Series:
    """The reason of each usage offer, from the evidence usage_candidates kept."""
    services = catalog.services("usage")
    said = (
        offers["usage_app"].astype(str)
        + " use "
        + format_values(offers["usage_seconds"], "seconds").to_numpy()
        + " a day vs "
        + format_values(offers["usage_typical"], "seconds").to_numpy()
        + " typical of its usage peers"
    )
    reasons = pd.Series(index=offers.index, dtype=object)
    for number, service in enumerate(services):
        rows = (offers["usage_service"] == number).to_numpy()
        titled = _titled(service.title, "{app}", offers.loc[rows, "usage_app"].astype(str))
        reasons[rows] = (titled + ": " + said[rows]).to_numpy()
    return reasons


def health_faults(anomalies: pd.DataFrame) -> pd.DataFrame:
    """The flagged rows that are faults: kind `health`, or no kind (flags written before kinds)."""
    flagged = anomalies["is_anomaly"].astype(bool)
    if "kind" in anomalies.columns:
        flagged &= anomalies["kind"].isna() | (anomalies["kind"] == HEALTH)
    return anomalies[flagged]


def emerging_needs(anomalies: pd.DataFrame) -> pd.Series:
    """Flags of another kind than health (a move, a surge in an app) per kind: needs for the
    triggers that serve them, never for support."""
    if "kind" not in anomalies.columns:
        return pd.Series(dtype="int64")
    flagged = anomalies[anomalies["is_anomaly"].astype(bool)]
    return flagged.loc[flagged["kind"].notna() & (flagged["kind"] != HEALTH), "kind"].value_counts()


def support_candidates(inputs: OfferInputs, catalog: ServiceCatalog) -> pd.DataFrame:
    flagged = health_faults(inputs.anomalies)
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


@dataclass
class TicketChanges:
    opened: pd.DataFrame  # TICKET_COLUMNS: new open tickets
    updated: pd.DataFrame  # ticket_id, severity, reason, last_seen_day: open tickets whose fault persists
    resolved: pd.DataFrame  # ticket_id: open tickets whose device was back within its norm long enough


def ticket_changes(
    anomalies: pd.DataFrame, stored: pd.DataFrame, catalog: ServiceCatalog, day: str
) -> TicketChanges:
    """The support outbox's lifecycle for `day`. `stored`: the open tickets and those last seen
    on `day` or later (ticket_id, device_id, cause, severity, status, last_seen_day).

    A device's fault is one ticket from the day it is first flagged as a health fault (at or
    above `ticket_severity`) until it is resolved, whichever of its keys leads from day to day:
    its id hashes device, the first cause and the opening day, so a re-run of the day finds it
    and adds none, and a fault that comes back after its ticket was resolved opens a new one.
    While the device is flagged as a health fault (any score) its open ticket is updated
    (cause, severity, reason, last seen day, never moved back by a re-run of an earlier day). An
    open ticket whose device was last flagged `ticket_resolve_days` or more before `day` is
    resolved, and so are a device's other open tickets from when tickets were per device and
    cause (its oldest carries the fault on). No ticket opens for a device with a ticket seen on
    `day` or later (an earlier day re-run)."""
    faults = health_faults(anomalies)
    faults = faults.assign(cause=faults["cause"].fillna("segment_distance"))
    faults = faults.sort_values("score", ascending=False, kind="stable").drop_duplicates("device_id")
    stored = stored.astype({"last_seen_day": object})
    open_now = stored[stored["status"] == "open"]
    # Open tickets written when a ticket was per device and cause (before revision 0007's code):
    # a device's oldest open ticket carries its fault on, the others are resolved into it.
    oldest_first = ["created_at", "ticket_id"] if "created_at" in open_now.columns else ["ticket_id"]
    open_now = open_now.sort_values(oldest_first, kind="stable")
    device_key = open_now["device_id"].astype(str)
    merged = open_now[device_key.duplicated()]
    latest_seen = open_now["last_seen_day"].fillna("").groupby(device_key).transform("max")
    carried = open_now.assign(last_seen_day=latest_seen)[~device_key.duplicated()]
    # The oldest carries on when its device's fault was last seen (written back below).
    moved_on = carried["last_seen_day"].to_numpy(dtype=object) != open_now.loc[
        carried.index, "last_seen_day"
    ].fillna("").to_numpy(dtype=object)
    open_now = carried
    faulty = faults["device_id"].astype(str)
    open_devices = open_now["device_id"].astype(str)
    seen_devices = stored.loc[stored["last_seen_day"].fillna("") >= day, "device_id"].astype(str)

    opens = any(s.opens_ticket for s in catalog.services("support"))
    severe = faults[
        (faults["score"].to_numpy() >= catalog.rules.ticket_severity)
        & ~faulty.isin(open_devices).to_numpy()
        & ~faulty.isin(seen_devices).to_numpy()
    ]
    if not opens:
        severe = severe.iloc[0:0]
    opened = pd.DataFrame(
        {
            "ticket_id": "ticket-"
            + hash_hex(pd.DataFrame({"d": severe["device_id"], "c": severe["cause"], "o": day})),
            "device_id": severe["device_id"].to_numpy(),
            "severity": severe["score"].to_numpy(),
            "cause": severe["cause"].to_numpy(),
            "reason": severe["reason"].fillna("flagged as an anomaly").to_numpy(),
            "status": "open",
            "last_seen_day": day,
        },
        columns=TICKET_COLUMNS,
    )

    by_device = faults.assign(device_id=faulty).set_index("device_id")[["score", "reason", "cause"]]
    persisting = open_now[open_devices.isin(faulty).to_numpy()]
    current = by_device.reindex(persisting["device_id"].astype(str))
    last_seen = np.maximum(persisting["last_seen_day"].fillna("").to_numpy(dtype=object), day)
    updated = pd.DataFrame(
        {
            "ticket_id": persisting["ticket_id"].to_numpy(),
            "cause": current["cause"].to_numpy(),
            "severity": current["score"].to_numpy(),
            "reason": current["reason"].fillna("flagged as an anomaly").to_numpy(),
            "last_seen_day": last_seen,
        }
    )
    changed = (
        (updated["severity"].to_numpy() != persisting["severity"].to_numpy())
        | (updated["cause"].to_numpy() != persisting["cause"].to_numpy())
        | (last_seen != persisting["last_seen_day"].to_numpy(dtype=object))
        | moved_on[open_devices.isin(faulty).to_numpy()]
    )
    updated = updated[changed].reset_index(drop=True)

    gone = open_now[~open_devices.isin(faulty).to_numpy()]
    seen = pd.to_datetime(gone["last_seen_day"], errors="coerce")
    quiet_days = (pd.Timestamp(day) - seen).dt.days
    quiet = quiet_days.to_numpy() >= catalog.rules.ticket_resolve_days
    resolved = gone.loc[quiet, ["ticket_id"]]
    carried_on = gone[~quiet & moved_on[~open_devices.isin(faulty).to_numpy()]]
    if len(carried_on):
        kept = pd.DataFrame(
            {
                "ticket_id": carried_on["ticket_id"].to_numpy(),
                "cause": carried_on["cause"].to_numpy(),
                "severity": carried_on["severity"].to_numpy(),
                "reason": carried_on["reason"].to_numpy()
                if "reason" in carried_on.columns
                else "flagged as an anomaly",
                "last_seen_day": carried_on["last_seen_day"].to_numpy(),
            }
        )
        updated = pd.concat([updated, kept], ignore_index=True)
    resolved = pd.concat([resolved, merged[["ticket_id"]]], ignore_index=True)
    return TicketChanges(opened, updated, resolved)


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
    priority, offer_day (cooldowns and the daily cap applied), counting the cooldowns from
    `inputs.history` and `inputs.rejections`. `lookalikes`: Qdrant's hits, see
    `lookalike_candidates`."""
    candidates = offer_candidates(inputs, catalog, lookalikes)
    contacts = last_contacts(inputs.history, inputs.rejections, inputs.day)
    return choose_offers(candidates, inputs, catalog, contacts)


def choose_offers(
    candidates: pd.DataFrame, inputs: OfferInputs, catalog: ServiceCatalog, contacts: pd.DataFrame
) -> pd.DataFrame:
    """The offers `recommend` makes of `candidates` (see `offer_candidates`), the cooldowns
    counted from `contacts` (see `last_contacts`), each with its reason."""
    offers = finalize(candidates, inputs, catalog, contacts)
    if "usage_service" not in offers.columns:
        return offers
    usage = (offers["trigger"] == "usage").to_numpy()
    reasons = offers["reason"].to_numpy(dtype=object, copy=True)
    reasons[usage] = usage_reasons(offers[usage], catalog).to_numpy()
    return offers.drop(columns=USAGE_EVIDENCE).assign(
        reason=pd.Series(reasons, index=offers.index, dtype=object)
    )


def offer_candidates(
    inputs: OfferInputs, catalog: ServiceCatalog, lookalikes: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every trigger's candidates, one per (device, service): a service two triggers offer a
    device goes out under the first in TRIGGER_RULES."""
    hits = lookalikes if lookalikes is not None else pd.DataFrame()
    candidates = pd.concat(
        [rule.candidates(inputs, catalog, hits) for rule in TRIGGER_RULES], ignore_index=True
    )
    return candidates.drop_duplicates(["device_id", "service_id"]).reset_index(drop=True)


CONTACT_COLUMNS = ["device_id", "service_id", "last_day"]


def last_contacts(history: pd.DataFrame, rejections: pd.DataFrame, day: str) -> pd.DataFrame:
    """Per (device, service): the last day before `day` it was offered (in `history`) or the
    device's latest answer to it was a rejection (`rejections`), whichever is later. The
    cooldowns count from it."""
    columns = ["device_id", "service_id", "offer_day"]
    earlier = history.loc[history["offer_day"] < day, columns]
    rejected = rejections.rename(columns={"rejected_day": "offer_day"})[columns]
    last = (
        pd.concat([earlier, rejected]).groupby(["device_id", "service_id"], as_index=False)["offer_day"].max()
    )
    return last.rename(columns={"offer_day": "last_day"})[CONTACT_COLUMNS]


@dataclass(frozen=True)
class TriggerRule:
    """A trigger: where its candidate offers come from, and the need of a device they serve."""

    name: str
    serves: str
    candidates: Callable[[OfferInputs, ServiceCatalog, pd.DataFrame], pd.DataFrame]


# The triggers (service_catalog.TRIGGERS names them, in this order). The order is the precedence:
# a service two triggers offer a device on the same day goes out under the first.
TRIGGER_RULES: tuple[TriggerRule, ...] = (
    TriggerRule(
        "location", "a move to another city", lambda inputs, catalog, _: location_candidates(inputs, catalog)
    ),
    TriggerRule(
        "usage",
        "heavy use of an app, against usage peers",
        lambda inputs, catalog, _: usage_candidates(inputs, catalog),
    ),
    TriggerRule(
        "support",
        "a health fault (flag of kind health)",
        lambda inputs, catalog, _: support_candidates(inputs, catalog),
    ),
    TriggerRule(
        "lookalike",
        "the need of the service, for devices near those that accepted it (Qdrant)",
        lambda inputs, catalog, hits: lookalike_candidates(hits, inputs, catalog),
    ),
)


def finalize(
    candidates: pd.DataFrame, inputs: OfferInputs, catalog: ServiceCatalog, contacts: pd.DataFrame
) -> pd.DataFrame:
    """Score, drop what is cooling down (`contacts`: see `last_contacts`), choose each device's
    offers within its limits."""
    if candidates.empty:
        return _empty().assign(
            offer_id=[], score=[], offer_day=[], expected_value=[], propensity=[], choice_rank=[], explored=[]
        )
    candidates = candidates[~_cooling(candidates, contacts, inputs.day, catalog)].reset_index(drop=True)
    candidates["score"] = candidates["strength"] * smoothed_acceptance(candidates, inputs.acceptance, catalog)
    value = catalog.per_service(candidates["service_id"], "value", 1.0).to_numpy(dtype=float)
    candidates["expected_value"] = candidates["score"].to_numpy() * value * candidates["priority"].to_numpy()
    candidates["offer_day"] = inputs.day
    candidates["offer_id"] = "offer-" + hash_hex(candidates[["device_id", "service_id", "offer_day"]])
    stored = inputs.history[["offer_id", "device_id", "service_id", "offer_day"]]
    chosen = choose(candidates, stored, inputs.day, catalog, fleet_devices=len(inputs.segments))
    return chosen.drop(columns=["strength"]).reset_index(drop=True)


def _cooling(
    candidates: pd.DataFrame, contacts: pd.DataFrame, day: str, catalog: ServiceCatalog
) -> np.ndarray:
    """A service is cooling down for a device within its cooldown of their last contact."""
    last = contacts.set_index(["device_id", "service_id"])["last_day"]
    previous_day = last.reindex(pd.MultiIndex.from_frame(candidates[["device_id", "service_id"]])).to_numpy()
    days_since = (pd.Timestamp(day) - pd.to_datetime(pd.Series(previous_day))).dt.days.to_numpy()
    cooldown = catalog.per_service(candidates["service_id"], "cooldown_days", 0).to_numpy()
    return pd.notna(previous_day) & (days_since < cooldown)


def choose(
    candidates: pd.DataFrame,
    stored: pd.DataFrame,
    day: str,
    catalog: ServiceCatalog,
    fleet_devices: int | None = None,
) -> pd.DataFrame:
    """The new offers of `day` that fit: each service within its daily capacity (best expected
    value first, over the fleet), each device within the slots it has left (`slots_left`).
    A device-day explores with probability `exploration_share` (a draw seeded by device and
    day, so every re-run draws the same): its slots go to eligible services in a uniformly
    random order (seeded by device, service and day), those scoring below `min_score` too.
    Otherwise they go to the services scoring at least `min_score`, highest expected value
    first. A health fault's support offers come first either way. `propensity` is the
    probability the offer was chosen: (1 - share) when expected value picks it, plus share x
    the slots left after support / the other eligible services (share when support);
    `choice_rank` its place in the device's order (the writer re-applies the limits in that
    order). Then the fleet's budget for the day (`within_fleet_budget`)."""
    rules = catalog.rules
    new = candidates[~_is_in(candidates["offer_id"], stored["offer_id"])]
    new = within_capacity(new, stored, day, catalog).reset_index(drop=True)
    left = slots_left(new["device_id"], stored, day, rules.daily_cap, rules.max_offers_per_week)
    share = rules.exploration_share
    above = new["score"].to_numpy() >= rules.min_score
    devices = pd.factorize(new["device_id"].to_numpy())[0]
    ids = _text_order(new["offer_id"])
    exploit = _rank_per_device(devices, -np.where(above, _value(new), -np.inf), ids)
    exploit = np.where(above, exploit, np.iinfo(np.int64).max)
    # A health fault's support offers come first when exploring too: a random draw never
    # displaces them.
    support = (new["trigger"] == "support").to_numpy()
    draws = np.where(
        support, -1.0 + _value(new) * 1e-9, _uniform(new[["device_id", "service_id", "offer_day"]], "order")
    )
    explore = _rank_per_device(devices, draws, ids)
    exploring = explores(new["device_id"], new["offer_day"], share)
    supported = np.bincount(devices, weights=support, minlength=devices.max(initial=-1) + 1)[devices]
    others = np.bincount(devices)[devices] - supported
    in_exploit, in_explore = exploit < left, explore < left
    chosen = np.where(exploring, in_explore, in_exploit)
    drawn = np.minimum(np.maximum(left - supported, 0), others) / np.maximum(others, 1)
    propensity = (1.0 - share) * in_exploit + share * np.where(support, in_explore, drawn)
    # Where the device stands for the fleet's budget: from its candidates, not from what it chose.
    device_priority = _device_priority(new, devices)
    # And how much of it the device may take: what an exploring day would (its slots, or every
    # candidate), whether or not this day explores.
    device_slots = np.minimum(left, supported + others)
    made = new.assign(
        propensity=propensity,
        choice_rank=np.where(exploring, explore, exploit),
        explored=exploring,
        device_priority=device_priority,
        device_slots=device_slots,
    )[chosen]
    return within_fleet_budget(made, stored, day, rules.max_offers_per_device_day, fleet_devices)


def within_fleet_budget(
    offers: pd.DataFrame, stored: pd.DataFrame, day: str, share: float | None, fleet_devices: int | None
) -> pd.DataFrame:
    """The offers that fit in the fleet's budget for `day`: `share` x `fleet_devices` (rounded up)
    less the offers `stored` for that day, given whole devices at a time in the order of
    `device_priority` (devices with a health fault's support offer first, then the best expected
    value among the device's candidates), each counted at `device_slots` (what the device would
    take on a day that explores); see `choose`. Neither depends on whether the device's day
    explored, so neither does whether it is served, and each offer's `propensity` stays the chance
    it was chosen given its device is served. The first device is served whenever any budget is
    left, so a small fleet is never starved by one device with more offers than its budget. No
    budget when `share` or `fleet_devices` is None."""
    if share is None or fleet_devices is None or offers.empty:
        return offers
    budget = int(np.ceil(share * fleet_devices)) - int((stored["offer_day"] == day).sum())
    if budget <= 0:
        return offers.iloc[0:0]
    if "device_priority" in offers.columns:
        priority, slots = offers["device_priority"].to_numpy(), offers["device_slots"].to_numpy()
    else:  # offers from elsewhere: the device's best offer and its count stand for it
        priority = _device_priority(offers)
        slots = offers.groupby("device_id")["offer_id"].transform("size").to_numpy()
    devices = pd.DataFrame(
        {"device_id": offers["device_id"].to_numpy(), "priority": priority, "slots": slots}
    )
    per_device = devices.groupby("device_id", sort=True).agg(
        priority=("priority", "max"), slots=("slots", "max")
    )
    per_device = per_device.sort_values("priority", ascending=False, kind="stable")
    fits = per_device["slots"].cumsum().to_numpy() <= budget
    fits[0] = True
    return offers[_is_in(offers["device_id"], per_device.index[fits])]


def _device_priority(offers: pd.DataFrame, devices: np.ndarray | None = None) -> np.ndarray:
    """Per row, its device's place for the fleet's budget: a health fault's support first, then
    the best expected value among the device's rows. `devices`: the rows' device codes, when
    the caller has them."""
    codes = pd.factorize(offers["device_id"].to_numpy())[0] if devices is None else devices
    support = (offers["trigger"] == "support").to_numpy()
    priority = support * SUPPORT_FIRST + _value(offers)
    best = np.full(codes.max(initial=-1) + 1, -np.inf)
    np.fmax.at(best, codes, priority)
    return best[codes]


def within_limits(
    offers: pd.DataFrame,
    stored: pd.DataFrame,
    day: str,
    catalog: ServiceCatalog,
    fleet_devices: int | None = None,
) -> pd.DataFrame:
    """The offers of `day` not stored yet that still fit against what `stored` holds (the
    offers within 6 days either side of `day`, as the writer reads them when the rows go in):
    each service's daily capacity, then each device's slots, in the device's `choice_rank`
    order (expected value when the frame has none). An offer made is never taken back."""
    new = offers[~_is_in(offers["offer_id"], stored["offer_id"])]
    new = within_capacity(new, stored, day, catalog)
    rules = catalog.rules
    left = slots_left(new["device_id"], stored, day, rules.daily_cap, rules.max_offers_per_week)
    devices, ids = new["device_id"].to_numpy(), _text_order(new["offer_id"])
    order = new["choice_rank"].to_numpy(dtype=float) if "choice_rank" in new.columns else -_value(new)
    fitting = new[_rank_per_device(devices, order, ids) < left]
    return within_fleet_budget(fitting, stored, day, rules.max_offers_per_device_day, fleet_devices)


def within_capacity(
    offers: pd.DataFrame, stored: pd.DataFrame, day: str, catalog: ServiceCatalog
) -> pd.DataFrame:
    """The offers within their service's `daily_capacity` (less what is stored for `day`),
    the highest expected value first over the fleet; services without a capacity keep all."""
    if offers.empty:
        return offers
    capacity = catalog.per_service(offers["service_id"], "daily_capacity", None)
    capacity = pd.to_numeric(capacity).to_numpy(dtype=float)
    if np.isnan(capacity).all():
        return offers
    made = stored.loc[stored["offer_day"] == day, "service_id"].value_counts()
    left = capacity - made.reindex(offers["service_id"]).fillna(0).to_numpy()
    rank = _rank_per_device(offers["service_id"].to_numpy(), -_value(offers), _text_order(offers["offer_id"]))
    return offers[np.isnan(left) | (rank < left)]


def slots_left(
    devices: pd.Series, stored: pd.DataFrame, day: str, daily_cap: int, weekly_cap: int | None
) -> np.ndarray:
    """Per row of `devices`, the offers it may still get on `day`: the daily cap less its
    offers stored that day, and the weekly budget less its offers in the fullest 7 days in a
    row that contain `day` (offers on later days count too, so a day re-run after the days
    that follow it cannot overfill their weeks)."""
    offset = (pd.to_datetime(stored["offer_day"]) - pd.Timestamp(day)).dt.days.to_numpy()
    near = np.abs(offset) < WEEK_DAYS
    codes, known = pd.factorize(stored["device_id"].to_numpy()[near])
    counts = np.zeros((len(known), 2 * WEEK_DAYS - 1))
    np.add.at(counts, (codes, offset[near].astype(int) + WEEK_DAYS - 1), 1)
    left = daily_cap - counts[:, WEEK_DAYS - 1]
    fresh = float(daily_cap)
    if weekly_cap is not None:
        running = np.concatenate([np.zeros((len(known), 1)), counts.cumsum(axis=1)], axis=1)
        weeks = running[:, WEEK_DAYS : 2 * WEEK_DAYS] - running[:, 0:WEEK_DAYS]
        fullest = weeks.max(axis=1) if len(known) else np.zeros(0)
        left = np.minimum(left, weekly_cap - fullest)
        fresh = float(min(daily_cap, weekly_cap))
    where = pd.Index(known).get_indexer(np.asarray(devices))
    found = left[np.clip(where, 0, None)] if len(known) else np.zeros(len(where))
    return np.where(where >= 0, found, fresh).clip(min=0)


def _rank_per_device(groups: np.ndarray, order: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row's place (0 = first) within its group by `order` ascending, then id (`groups`
    and `ids` as values or as integer codes; the ids' codes must sort as the ids do)."""
    if len(groups) == 0:
        return np.zeros(0, dtype=np.int64)
    # Integer keys sort far faster than text; a group's codes need no order, the ids' keep theirs.
    group_codes = _codes(groups)
    id_codes = ids if np.issubdtype(np.asarray(ids).dtype, np.integer) else _text_order(ids)
    in_order = np.lexsort((id_codes, np.asarray(order, dtype=float), group_codes))
    sorted_groups = group_codes[in_order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    first_of_run = np.repeat(starts, np.diff(np.r_[starts, len(in_order)]))
    rank = np.empty(len(in_order), dtype=np.int64)
    rank[in_order] = np.arange(len(in_order)) - first_of_run
    return rank


def _codes(values: np.ndarray) -> np.ndarray:
    """Integer codes of `values` (integers are codes already)."""
    values = np.asarray(values)
    return values if np.issubdtype(values.dtype, np.integer) else pd.factorize(values)[0]


def _text_order(values: np.ndarray | pd.Series) -> np.ndarray:
    """Integers that sort as `values` do (Arrow ranks text in C++, far faster than sorting objects;
    a column of pandas' Arrow-backed text goes to Arrow without becoming Python strings)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    text = values if isinstance(values, pd.Series) else np.asarray(values, dtype=object)
    return pc.rank(pa.array(text), tiebreaker="dense").to_numpy()


def _is_in(values: pd.Series, wanted: pd.Series | pd.Index) -> np.ndarray:
    """`values.isin(wanted)` for text columns (ids; anything else is compared as its text), in
    Arrow: pandas builds the set of Arrow-backed text one Python value at a time, seconds for the
    hundreds of thousands of offers of a week."""
    if len(values) == 0 or len(wanted) == 0:
        return np.zeros(len(values), dtype=bool)
    found = pc.is_in(pa.array(values.astype(str)), value_set=pa.array(pd.Series(wanted).astype(str)))
    return found.to_numpy(zero_copy_only=False)


def _value(offers: pd.DataFrame) -> np.ndarray:
    if "expected_value" in offers.columns:
        return offers["expected_value"].to_numpy(dtype=float)
    return (offers["score"] * offers["priority"]).to_numpy(dtype=float)


def explores(device_ids: pd.Series, days: pd.Series | str, share: float) -> np.ndarray:
    """Whether each device explores on its day: a draw seeded by (device, day) below `share`."""
    frame = pd.DataFrame({"device_id": np.asarray(device_ids), "offer_day": days})
    return _uniform(frame, "explore") < share


def _uniform(frame: pd.DataFrame, salt: str) -> np.ndarray:
    """A deterministic draw in [0, 1) per row, from a hash of the row's values and `salt`."""
    if frame.empty:
        return np.zeros(0)
    hashes = pd.util.hash_pandas_object(frame.astype(str).assign(salt=salt), index=False).to_numpy()
    return (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)


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


def hash_hex(frame: pd.DataFrame) -> pd.Series:
    hashes = pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy()
    # 16 hex digits per row, formatted for the whole column at once.
    digits = np.frombuffer(hashes.astype(">u8").tobytes().hex().encode(), dtype="S16").astype(str)
    return pd.Series(digits, index=frame.index)


def contact_limit_breaches(offers: pd.DataFrame, day: str, daily_cap: int, per_week: int) -> dict[str, int]:
    """What the stored offers (device_id, service_id, offer_day; at least the 7 days up to `day`)
    break on `day`: devices over the daily cap, devices over the weekly budget in the 7 days
    ending on `day`, and (device, service) pairs offered twice that day."""
    week_start = (pd.Timestamp(day) - pd.Timedelta(days=WEEK_DAYS - 1)).strftime("%Y-%m-%d")
    week = offers[(offers["offer_day"] >= week_start) & (offers["offer_day"] <= day)]
    today = week[week["offer_day"] == day]
    return {
        "devices_over_daily_cap": int((today["device_id"].value_counts() > daily_cap).sum()),
        "devices_over_weekly_budget": int((week["device_id"].value_counts() > per_week).sum()),
        "duplicate_offers": int(today.duplicated(["device_id", "service_id"]).sum()),
    }
