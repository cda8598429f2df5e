"""The contact policy and the support outbox: tickets only for health faults, with a lifecycle;
at most `max_offers_per_week` offers per device over any 7 days, across runs, re-runs and days
re-run in another order; a service's daily capacity; no offer of a rejected service within its
cooldown; exploration with recorded propensities; heavy use judged in a space the learned
weights do not move."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_pipeline.offers import storage as offers_storage
from persona_pipeline.offers.recommend import OfferInputs, choose, recommend, ticket_changes, usage_candidates
from persona_pipeline.service_catalog import ServiceCatalog
from persona_pipeline_tests.conftest import table
from persona_pipeline_tests.test_offers import DAY, inputs, shipped, uncapped
from persona_pipeline_tests.test_offers_reruns import fullest_weeks

# The fleet's daily budget is left out where a handful of devices would leave it one or two
# offers; test_contact_policy's fleet budget tests set it.
CATALOG = shipped()
WEEK = CATALOG.rules.max_offers_per_week
HISTORY_COLUMNS = ["offer_id", "device_id", "service_id", "trigger", "offer_day", "score", "priority"]


def with_services(**changes) -> ServiceCatalog:
    """The shipped catalog with fields of some services changed: {service_id: {field: value}}."""
    services = tuple(s.model_copy(update=changes.get(s.id, {})) for s in CATALOG.spec.services)
    return ServiceCatalog(CATALOG.spec.model_copy(update={"services": services}), "test")


def with_rules(**changes) -> ServiceCatalog:
    rules = CATALOG.rules.model_copy(update=changes)
    return ServiceCatalog(CATALOG.spec.model_copy(update={"rules": rules}), "test")


def day_after(day: str, days: int) -> str:
    return (pd.Timestamp(day) + pd.Timedelta(days=days)).strftime("%Y-%m-%d")


# -- Faults versus needs ----------------------------------------------------------------------


@pytest.mark.store_agnostic
def test_only_health_faults_get_support_offers_and_tickets():
    """A behaviour flag (a surge in an app, a move) scores high, but support is for faults; a
    flag without a kind (written before kinds) still counts as a fault."""
    anomalies = pd.DataFrame(
        {
            "device_id": ["sick", "a", "b"],
            "score": [0.8, 0.95, 0.9],
            "is_anomaly": [True, True, True],
            "reason": ["crashes 14 vs 0–1", "maps 5 h a day", "moved to Vienna"],
            "cause": ["device.health.crash_count", "device.usage.app_maps_duration", "device.location.city"],
            "kind": [None, "behaviour", "context"],
        }
    )
    offers = recommend(inputs(anomalies=anomalies), CATALOG)
    assert set(offers.loc[offers["trigger"] == "support", "device_id"]) == {"sick"}
    empty = pd.DataFrame(columns=["ticket_id", "device_id", "cause", "severity", "status", "last_seen_day"])
    tickets = ticket_changes(anomalies, empty, CATALOG, DAY).opened
    assert tickets["device_id"].tolist() == ["sick"]
    as_health = anomalies.assign(kind="health")
    assert set(ticket_changes(as_health, empty, CATALOG, DAY).opened["device_id"]) == {"sick", "a", "b"}


def flagged(day_flags: dict[str, float]) -> pd.DataFrame:
    devices = list(day_flags)
    return pd.DataFrame(
        {
            "device_id": devices,
            "score": list(day_flags.values()),
            "is_anomaly": True,
            "reason": "crashes 14 vs 0–1",
            "cause": "device.health.crash_count",
            "kind": "health",
        }
    )


def test_a_ticket_is_opened_once_updated_while_the_fault_persists_and_resolved_after_it(resources):
    store = resources["persona_store"]
    now = pd.Timestamp("2026-03-10T12:00Z")
    days = [day_after(DAY, n) for n in range(6)]
    sick = flagged({"sick": 0.8})

    assert len(offers_storage.write_tickets(store, sick, CATALOG, days[0], now).opened) == 1
    first = table(store, "support_tickets")
    assert first[["status", "last_seen_day"]].values.tolist() == [["open", days[0]]]
    changes = offers_storage.write_tickets(store, flagged({"sick": 0.9}), CATALOG, days[1], now)
    assert changes.opened.empty and len(changes.updated) == 1
    again = offers_storage.write_tickets(store, flagged({"sick": 0.9}), CATALOG, days[1], now)
    assert again.opened.empty and again.updated.empty  # the day re-run: nothing new
    ticket = table(store, "support_tickets").iloc[0]
    assert (ticket["severity"], ticket["last_seen_day"]) == (0.9, days[1])
    assert ticket["created_at"] == first["created_at"].iloc[0]

    healthy = flagged({}).astype({"score": float})
    assert offers_storage.write_tickets(store, healthy, CATALOG, days[2], now).resolved.empty  # 1 day
    resolved = offers_storage.write_tickets(store, healthy, CATALOG, days[3], now).resolved
    assert resolved["ticket_id"].tolist() == [ticket["ticket_id"]]  # 2 days without the fault
    assert offers_storage.read_open_tickets(store).empty

    # A re-run of a day the fault was seen opens nothing (a later day already saw the ticket).
    assert offers_storage.write_tickets(store, sick, CATALOG, days[1], now).opened.empty
    # The fault comes back later: a new ticket, the resolved one stays resolved.
    back = offers_storage.write_tickets(store, sick, CATALOG, days[5], now).opened
    assert len(back) == 1 and back["ticket_id"].iloc[0] != ticket["ticket_id"]
    tickets = table(store, "support_tickets").set_index("ticket_id")
    assert tickets.loc[ticket["ticket_id"], "status"] == "resolved"
    assert offers_storage.read_open_tickets(store)["ticket_id"].tolist() == back["ticket_id"].tolist()


# -- The weekly budget, across runs and days re-run in any order -------------------------------


def busy_inputs(day: str, history: pd.DataFrame) -> OfferInputs:
    """Every device of `inputs()` qualifies every day: `mover` moved the day before."""
    base = inputs(day=day, history=history)
    moves = base.moves.assign(changed_at=pd.Timestamp(day, tz="UTC") - pd.Timedelta(hours=2))
    return inputs(day=day, history=history, moves=moves)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 0, 4, 2, 6, 1, 7, 3, 5, 8, 0]])
def test_the_weekly_budget_holds_over_days_run_in_any_order(resources, order):
    """Each day's offers made and written against what the store holds, the days in order and
    then re-run out of order: no device ever has more than the budget in 7 days in a row.
    Before the budget, a heavy user got an offer each day its cooldowns allowed."""
    store = resources["persona_store"]
    catalog = uncapped(daily_cap=3, max_offers_per_week=WEEK)
    for number in order:
        day = day_after(DAY, number)
        history = table(store, "service_recommendations")
        history = history[HISTORY_COLUMNS] if len(history) else pd.DataFrame(columns=HISTORY_COLUMNS)
        offers = recommend(busy_inputs(day, history), catalog)
        offers_storage.write_offers(store, offers.assign(created_at=pd.Timestamp.now(tz="UTC")), day, catalog)
    offers = table(store, "service_recommendations")
    assert fullest_weeks(offers).max() == WEEK
    assert not offers.duplicated(["device_id", "service_id", "offer_day"]).any()
    assert offers["propensity"].between(0, 1).all() and offers["propensity"].notna().all()


def test_the_writer_keeps_the_budget_against_offers_stored_on_later_days(resources):
    """A run of an earlier day that read no history cannot fill a week the later days filled."""
    store = resources["persona_store"]
    catalog = uncapped(daily_cap=3, max_offers_per_week=WEEK)
    later = day_after(DAY, 3)
    made = recommend(busy_inputs(later, pd.DataFrame(columns=HISTORY_COLUMNS)), catalog)
    offers_storage.write_offers(store, made.assign(created_at=pd.Timestamp.now(tz="UTC")), later, catalog)
    full = set(made.groupby("device_id").size().loc[lambda n: n == WEEK].index)
    assert full
    stale = recommend(busy_inputs(DAY, pd.DataFrame(columns=HISTORY_COLUMNS)), catalog)
    written = offers_storage.write_offers(
        store, stale.assign(created_at=pd.Timestamp.now(tz="UTC")), DAY, catalog
    )
    assert not full & set(written["device_id"])


# -- Capacity, rejections, expected value ------------------------------------------------------


@pytest.mark.store_agnostic
def test_a_services_daily_capacity_holds_across_runs_best_expected_value_first():
    anomalies = flagged({"sick": 0.8, "sicker": 0.95, "sickest": 0.99})
    catalog = with_services(support_callback={"daily_capacity": 2})
    first = recommend(inputs(anomalies=anomalies), catalog)
    callbacks = first[first["service_id"] == "support_callback"]
    assert set(callbacks["device_id"]) == {"sicker", "sickest"}
    # A later run of the day that finds another sick device adds no callback.
    more = pd.concat([anomalies, flagged({"new": 0.99})], ignore_index=True)
    second = recommend(inputs(anomalies=more, history=first[HISTORY_COLUMNS]), catalog)
    assert "support_callback" not in set(second["service_id"])
    assert "diagnostics_tool" in set(second.loc[second["device_id"] == "new", "service_id"])


@pytest.mark.store_agnostic
def test_a_rejected_service_is_not_offered_again_within_its_cooldown_from_the_rejection():
    """Offered 20 days ago (cooldown 14 from the offer has passed), rejected 3 days ago."""
    catalog = uncapped()
    offered = recommend(inputs(), catalog)
    mover = offered[offered["device_id"] == "mover"]
    assert "localized_support_docs" in set(mover["service_id"])
    rejected = pd.DataFrame(
        {
            "device_id": ["mover"],
            "service_id": ["localized_support_docs"],
            "rejected_day": [day_after(DAY, -3)],
        }
    )
    again = recommend(inputs(rejections=rejected), catalog)
    assert ("mover", "localized_support_docs") not in set(
        zip(again["device_id"], again["service_id"], strict=True)
    )
    assert "regional_services" in set(again.loc[again["device_id"] == "mover", "service_id"])


@pytest.mark.store_agnostic
def test_the_offers_that_fit_are_those_of_the_highest_expected_value():
    """`heavy` qualifies for six usage services and has room for two: the two of the highest
    acceptance x value x priority, which the catalog's values decide."""
    offers = recommend(inputs(), with_rules(exploration_share=0.0))
    heavy = set(offers.loc[offers["device_id"] == "heavy", "service_id"])
    assert heavy == {"car_mount", "headphones"}  # value 2 x priority 0.4 beats 1 x 0.6
    cheap = with_services(car_mount={"value": 0.1}, headphones={"value": 0.1})
    cheap = ServiceCatalog(
        cheap.spec.model_copy(update={"rules": with_rules(exploration_share=0.0).rules}), "t"
    )
    heavy = set(recommend(inputs(), cheap).query("device_id == 'heavy'")["service_id"])
    assert heavy == {"app_tutorial:maps", "app_tutorial:podcast"}
    assert (offers["propensity"] == 1.0).all()  # nothing explores: every offer was certain


# -- Exploration ---------------------------------------------------------------------------------


GROUP_MINUTES = np.array([[60, 5, 5], [5, 60, 5], [5, 5, 90], [10, 10, 10]])  # maps, music, games


def many_heavy_users(devices: int) -> tuple[OfferInputs, set[str]]:
    """`devices` devices in four behaviour groups (one keen on each app, one light); one in
    twenty uses one app (any) five times as much as its group. Returns the inputs and the
    heavy users."""
    rng = np.random.default_rng(5)
    ids = np.array([f"d{i:05d}" for i in range(devices)])
    group = rng.integers(0, len(GROUP_MINUTES), devices)
    minutes = GROUP_MINUTES[group] * rng.lognormal(0.0, 0.2, size=(devices, 3))
    heavy = rng.random(devices) < 0.05
    minutes[np.flatnonzero(heavy), rng.integers(0, 3, heavy.sum())] *= 5
    usage = pd.DataFrame(
        minutes * 60, index=pd.Index(ids, name="device_id"), columns=["maps", "music", "games"]
    )
    fleet = inputs(
        app_usage=usage,
        moves=inputs().moves.iloc[0:0],
        anomalies=flagged({}).astype({"score": float}),
        segments=pd.Series(1, index=ids),
    )
    return fleet, set(ids[heavy])


@pytest.mark.store_agnostic
def test_a_small_share_of_device_days_explores_and_every_offer_says_how_likely_it_was():
    catalog = CATALOG  # exploration_share 0.05
    fleet, _ = many_heavy_users(20_000)
    offers = recommend(fleet, catalog)
    again = recommend(fleet, catalog)
    assert offers["offer_id"].tolist() == again["offer_id"].tolist()  # a re-run draws the same
    devices = offers.groupby("device_id")
    explored = devices["explored"].first()
    # About 1,000 devices offered, each exploring with probability 0.05: within 4.5 standard deviations.
    share = explored.mean()
    assert abs(share - 0.05) < 4.5 * np.sqrt(0.05 * 0.95 / len(explored)), share
    chosen_by_value = offers[~offers["explored"]]
    assert (chosen_by_value["propensity"] >= 0.95).all()
    assert (offers.loc[offers["explored"], "propensity"] < 0.95).any()  # a service value would not pick
    assert offers["propensity"].between(0, 1).all()
    assert set(offers.loc[offers["explored"], "service_id"]) > {"car_mount"}
    # Another day draws other devices.
    tomorrow = (
        recommend(OfferInputs(**{**fleet.__dict__, "day": day_after(DAY, 1)}), catalog)
        .groupby("device_id")["explored"]
        .first()
    )
    assert set(tomorrow[tomorrow].index) != set(explored[explored].index)


# -- Heavy use against peers the weights do not move ---------------------------------------------


@pytest.mark.store_agnostic
def test_heavy_use_does_not_follow_the_segments():
    """Segments follow the learned weights. When they put the heavy users together, heavy use
    judged against the segment's median found none of them; with other segments, others.
    Judged against usage peers in the raw app use, the same devices are heavy whatever the
    segments, and they are mostly the heavy users: a light user whose surge makes it look
    like a keen one (50 min of maps) is judged among the keen ones and not found, so about
    one in six is missed on this fleet."""
    fleet, heavy_devices = many_heavy_users(3000)
    index = fleet.app_usage.index
    by_heaviness = pd.Series(np.where(index.isin(list(heavy_devices)), 1, 2), index=index)
    shuffled = pd.Series(np.random.default_rng(1).integers(0, 9, len(index)), index=index)
    found = [
        set(usage_candidates(OfferInputs(**{**fleet.__dict__, "segments": segments}), CATALOG)["device_id"])
        for segments in (fleet.segments, by_heaviness, shuffled)
    ]
    assert found[0] == found[1] == found[2]
    recall = len(found[0] & heavy_devices) / len(heavy_devices)
    precision = len(found[0] & heavy_devices) / len(found[0])
    assert recall >= 0.8 and precision >= 0.9, (recall, precision)


# -- The fleet's daily budget ---------------------------------------------------------------


def crowded_inputs(day: str, history: pd.DataFrame, movers: int = 30, devices: int = 40) -> OfferInputs:
    """A fleet of `devices` where `movers` moved the day before and one device has a fault."""
    ids = [f"d{number:02d}" for number in range(devices)]
    moved_at = pd.Timestamp(day, tz="UTC") - pd.Timedelta(hours=2)
    moves = pd.DataFrame(
        {
            "device_id": ids[:movers],
            "previous_value": "Berlin",
            "value": "Vienna",
            "changed_at": [moved_at] * movers,
        }
    )
    anomalies = pd.DataFrame(
        {
            "device_id": [ids[-1]],
            "score": [0.9],
            "is_anomaly": [True],
            "reason": ["crashes 14 vs 0–1"],
            "cause": ["device.health.crash_count"],
            "kind": ["health"],
        }
    )
    return inputs(
        day=day,
        history=history,
        moves=moves,
        anomalies=anomalies,
        segments=pd.Series(1, index=ids),
        app_usage=pd.DataFrame({"maps": 600.0}, index=pd.Index(ids, name="device_id")),
    )


def test_the_fleets_daily_budget_holds_across_runs_support_first(resources):
    """30 of 40 devices moved on one day: a quarter of the fleet (10 offers) is made that day, the
    device with a fault first, whole devices at a time, and a second run of the day adds none;
    the next day the movers not served yet get theirs."""
    store = resources["persona_store"]
    catalog = with_rules(max_offers_per_device_day=0.25, exploration_share=0.0)
    made = recommend(crowded_inputs(DAY, pd.DataFrame(columns=HISTORY_COLUMNS)), catalog)
    unbudgeted = recommend(
        crowded_inputs(DAY, pd.DataFrame(columns=HISTORY_COLUMNS)),
        with_rules(max_offers_per_device_day=None, exploration_share=0.0),
    )
    assert len(unbudgeted) > 10 and len(made) == 10
    assert {"diagnostics_tool", "support_callback"} <= set(made.loc[made["device_id"] == "d39", "service_id"])
    # Devices are served whole: each served device gets every offer it gets without the budget.
    served = unbudgeted[unbudgeted["device_id"].isin(made["device_id"])]
    assert set(served["offer_id"]) == set(made["offer_id"])
    now = pd.Timestamp.now(tz="UTC")
    offers_storage.write_offers(store, made.assign(created_at=now), DAY, catalog, fleet_devices=40)
    history = table(store, "service_recommendations")[HISTORY_COLUMNS]
    again = recommend(crowded_inputs(DAY, history), catalog)
    assert again.empty
    # A stale run that read no history is held to the budget by the writer.
    stale = recommend(crowded_inputs(DAY, pd.DataFrame(columns=HISTORY_COLUMNS)), catalog)
    written = offers_storage.write_offers(store, stale.assign(created_at=now), DAY, catalog, fleet_devices=40)
    assert written.empty
    next_day = day_after(DAY, 1)
    later = recommend(
        crowded_inputs(next_day, table(store, "service_recommendations")[HISTORY_COLUMNS]), catalog
    )
    assert len(later) == 10 and not set(later["device_id"]) & set(made["device_id"]) - {"d39"}


@pytest.mark.parametrize(("movers", "devices"), [(30, 40), (300, 400)])
def test_the_fleets_budget_serves_the_same_devices_whether_or_not_their_day_explores(movers, devices):
    """Ranked by the offers chosen, the budget dropped the explored ones first (they score lower):
    on 40 devices, every exploring device-day vanished, and the propensities stored no longer
    held. Devices are now served in an order set by their candidates, so the devices served do
    not depend on the exploration draw, and each offer made keeps the propensity it has without
    the budget."""
    history = pd.DataFrame(columns=HISTORY_COLUMNS)
    crowded = crowded_inputs(DAY, history, movers=movers, devices=devices)
    exploring = recommend(crowded, with_rules(max_offers_per_device_day=0.25, exploration_share=0.3))
    exploiting = recommend(crowded, with_rules(max_offers_per_device_day=0.25, exploration_share=0.0))
    assert exploring["explored"].any()
    assert set(exploring["device_id"]) == set(exploiting["device_id"])
    unbudgeted = recommend(crowded, with_rules(max_offers_per_device_day=None, exploration_share=0.3))
    propensity = unbudgeted.set_index("offer_id")["propensity"]
    assert np.allclose(exploring["propensity"], propensity.loc[exploring["offer_id"]])


def _two_offer_candidates(day: str, devices: int) -> pd.DataFrame:
    """Per device: one offer scoring above min_score, one below (only an exploring day takes it)."""
    rows = []
    for number in range(devices):
        for service, score in (("headphones", 0.5 - number * 0.01), ("car_mount", 0.05)):
            rows.append(
                {
                    "device_id": f"d{number}",
                    "service_id": service,
                    "trigger": "usage",
                    "score": score,
                    "strength": 1.0,
                    "priority": 1.0,
                    "expected_value": score,
                    "offer_day": day,
                    "offer_id": f"d{number}-{service}-{day}",
                    "reason": "r",
                    "cluster_id": 1,
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.store_agnostic
def test_offers_of_equal_value_are_chosen_by_offer_id_whatever_the_row_order():
    """Three services tie on expected value and the device has room for one: the offer whose id
    sorts first is chosen, and shuffling the rows does not change that."""
    candidates = pd.DataFrame(
        {
            "device_id": "d",
            "service_id": ["car_mount", "headphones", "app_tutorial:maps"],
            "trigger": "usage",
            "score": 0.5,
            "strength": 1.0,
            "priority": 1.0,
            "expected_value": 0.5,
            "offer_day": DAY,
            "offer_id": ["offer-b", "offer-a", "offer-c"],
            "reason": "r",
            "cluster_id": 1,
        }
    )
    stored = pd.DataFrame(columns=["offer_id", "device_id", "service_id", "offer_day"])
    catalog = with_rules(exploration_share=0.0, daily_cap=1)
    for seed in range(4):
        shuffled = candidates.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        assert choose(shuffled, stored, DAY, catalog)["offer_id"].tolist() == ["offer-a"], seed


def test_whether_a_device_is_served_does_not_depend_on_its_day_exploring():
    """An exploring day takes a device's low-scoring offer too, so counted by the offers chosen, a
    device that explored no longer fit where the same device exploiting did: it was never served
    on a day it explored, and its stored propensity was not the chance it was offered."""
    stored = pd.DataFrame(columns=["offer_id", "device_id", "service_id", "offer_day"])
    for day in pd.date_range("2026-01-01", periods=40).strftime("%Y-%m-%d"):
        candidates = _two_offer_candidates(day, devices=8)
        served = {
            share: set(
                choose(
                    candidates,
                    stored,
                    day,
                    with_rules(max_offers_per_device_day=0.375, exploration_share=share),
                    fleet_devices=8,
                )["device_id"]
            )
            for share in (0.0, 0.5)
        }
        assert served[0.0] == served[0.5], day


def test_a_small_fleets_budget_still_serves_its_fault():
    """Three devices make a budget of one offer; the device with a fault has two support offers.
    Counted whole, it did not fit and nothing was offered that day, nor any day after."""
    history = pd.DataFrame(columns=HISTORY_COLUMNS)
    crowded = crowded_inputs(DAY, history, movers=2, devices=3)
    made = recommend(crowded, with_rules(max_offers_per_device_day=0.3, exploration_share=0.0))
    assert set(made["device_id"]) == {"d02"} and (made["trigger"] == "support").all()
