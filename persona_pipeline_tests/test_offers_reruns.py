"""Offers and tickets under re-runs: a day re-run any number of times, in any order, after new
feedback or re-clustering, adds no offer or ticket twice, keeps the daily cap per device and
adds lookalikes only within what is left of the day's lookalike limit per service."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.config_files import config_file
from persona_pipeline.offers import storage as offers_storage
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.offers.recommend import recommend
from persona_pipeline.resources import PersonaConfig, PersonaStore
from persona_pipeline.segments.assets import device_clusters, segments
from persona_pipeline.service_catalog import SERVICE_CATALOG_FILE
from persona_pipeline.store.tables import offer_feedback
from persona_pipeline.store.tables import service_recommendations as service_recommendations_table
from persona_pipeline_tests.conftest import evaluated_fleet, resources_for, table
from persona_pipeline_tests.test_offers import DAY, inputs, shipped, uncapped

# The fleet's daily budget is left out where a handful of devices would leave it one or two
# offers; test_contact_policy's fleet budget tests set it.
CATALOG = shipped()
CAP = CATALOG.rules.daily_cap
WEEK = CATALOG.rules.max_offers_per_week
PER_SERVICE = CATALOG.rules.lookalike_per_service
REFIT = {"ops": {"segments": {"config": {"refit": True}}}}


def stored(offers: pd.DataFrame) -> pd.DataFrame:
    """Offers as `read_offer_history` returns them once written."""
    return offers[["offer_id", "device_id", "service_id", "trigger", "offer_day", "score", "priority"]]


def lookalike_hits(service_id: str, devices: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"service_id": service_id, "device_id": devices, "rank": range(len(devices)), "accepters": 9}
    )


@pytest.mark.store_agnostic
def test_offers_already_made_today_count_toward_the_daily_cap_whatever_their_rank():
    """Three lookalikes were stored for `sick` by an earlier run; the anomaly found since ranks
    higher, but the device has had its three offers for the day."""
    earlier_run = pd.DataFrame(
        {
            "offer_id": ["offer-1", "offer-2", "offer-3"],
            "device_id": "sick",
            "service_id": ["car_mount", "headphones", "smartwatch"],
            "trigger": "lookalike",
            "offer_day": DAY,
            "score": 0.2,
            "priority": 0.4,
        }
    )
    offers = recommend(inputs(history=earlier_run), CATALOG)
    assert "sick" not in set(offers["device_id"])
    assert not offers.empty  # the other devices still get theirs


@pytest.mark.store_agnostic
def test_a_device_with_room_left_today_gets_only_the_best_offers_that_fit():
    earlier_run = pd.DataFrame(
        {
            "offer_id": ["offer-1", "offer-2"],
            "device_id": "sick",
            "service_id": ["car_mount", "headphones"],
            "trigger": "lookalike",
            "offer_day": DAY,
            "score": 0.2,
            "priority": 0.4,
        }
    )
    # The weekly budget (2) would leave `sick` no slot at all; this is about the daily cap (3).
    catalog = uncapped(daily_cap=CAP)
    offers = recommend(inputs(history=earlier_run), catalog)
    sick = offers[offers["device_id"] == "sick"]
    assert sick["trigger"].tolist() == ["support"]  # one slot left, the best support offer


@pytest.mark.store_agnostic
def test_lookalikes_of_a_service_stay_within_the_days_limit_across_runs():
    """A second run whose query finds other devices (new examples, or the devices offered today
    left out of the query) adds none once the service had its lookalikes for the day."""
    first_devices = [f"near-{i}" for i in range(PER_SERVICE)]
    first = recommend(inputs(), CATALOG, lookalike_hits("car_mount", first_devices))
    assert (first["trigger"] == "lookalike").sum() == PER_SERVICE
    other_devices = [f"other-{i}" for i in range(PER_SERVICE)]
    second = recommend(inputs(history=stored(first)), CATALOG, lookalike_hits("car_mount", other_devices))
    assert second.empty
    again = recommend(inputs(history=stored(first)), CATALOG, lookalike_hits("car_mount", first_devices))
    assert again.empty


@pytest.mark.store_agnostic
def test_lookalikes_left_out_by_an_earlier_run_are_topped_up_nearest_first():
    """The earlier run made 15 lookalike offers of the service; a later one adds the 5 nearest
    new devices and no more."""
    first_devices = [f"near-{i}" for i in range(15)]
    first = recommend(inputs(), CATALOG, lookalike_hits("car_mount", first_devices))
    newer = [f"other-{i}" for i in range(PER_SERVICE)]
    second = recommend(
        inputs(history=stored(first)), CATALOG, lookalike_hits("car_mount", first_devices[:3] + newer)
    )
    assert set(second["device_id"]) == set(newer[: PER_SERVICE - 15])


# -- Through Dagster, on a generated fleet in real stores ------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A small demo fleet run through the whole chain: the last day has its offers."""
    yield from evaluated_fleet(tmp_path_factory.mktemp("reruns"), devices=400, days=4, seed=11)


@pytest.fixture(scope="module")
def whole_fleet_budget(tmp_path_factory) -> Path:
    """A configuration folder whose service catalog lets the whole fleet get offers on a day: these
    tests re-run a day whose budget (0.3 offers per device) the first run used up, to check the
    other limits (test_contact_policy tests the budget)."""
    config = tmp_path_factory.mktemp("config")
    shipped = config_file(SERVICE_CATALOG_FILE).read_text()
    budget = "  max_offers_per_device_day: 0.3\n"
    assert budget in shipped
    (config / SERVICE_CATALOG_FILE).write_text(shipped.replace(budget, "  max_offers_per_device_day: 1\n"))
    return config


def respond(store: PersonaStore, batch: str, accept_share: float, seed: int) -> int:
    """A feedback batch answering every offer not answered yet: `accept_share` accepted, the
    rest rejected (as the feedback asset would store it)."""
    offers = table(store, "service_recommendations", order_by=["offer_id"])
    answered = table(store, "offer_feedback")["offer_id"]
    open_offers = offers[~offers["offer_id"].isin(answered)]
    accepted = np.random.default_rng(seed).random(len(open_offers)) < accept_share
    rows = pd.DataFrame(
        {
            "batch_id": batch,
            "offer_id": open_offers["offer_id"].to_numpy(),
            "response": np.where(accepted, "accepted", "rejected"),
            "responded_at": pd.Timestamp.now(tz="UTC"),
            "source_file": f"{batch}/part-0.jsonl",
            "source_row": np.arange(1, len(open_offers) + 1),
        }
    )
    with store.begin() as connection:
        store.insert_frame(connection, offer_feedback, rows)
    return len(rows)


def offers_and_tickets_new(home: Path, *assets, config: Path | None = None) -> tuple[int, int]:
    """Materialize `assets` (segments refit) and then service_recommendations, with the
    configuration files in `config` where given: the offers and the tickets the run added."""
    resources = resources_for(home)
    if config is not None:
        resources["persona_config"] = PersonaConfig(config_dir=str(config))
    with dg.instance_for_test() as instance:
        run_config = REFIT if segments in assets else None
        result = dg.materialize(
            [*assets, service_recommendations],
            resources=resources,
            instance=instance,
            run_config=run_config,
        )
    metadata = result.asset_materializations_for_node("service_recommendations")[0].metadata
    return metadata["offers_new"].value, metadata["tickets_opened"].value


def offers_new(home: Path, *assets, config: Path | None = None) -> int:
    return offers_and_tickets_new(home, *assets, config=config)[0]


def assert_within_the_days_limits(store: PersonaStore) -> pd.DataFrame:
    offers = table(store, "service_recommendations")
    assert not offers.duplicated(["device_id", "service_id", "offer_day"]).any()
    per_device_day = offers.groupby(["device_id", "offer_day"]).size()
    assert per_device_day.max() <= CAP, per_device_day[per_device_day > CAP].head()
    fullest = fullest_weeks(offers)
    assert fullest.max() <= WEEK, fullest[fullest > WEEK].head()
    lookalikes = offers[offers["trigger"] == "lookalike"].groupby(["service_id", "offer_day"]).size()
    assert lookalikes.empty or lookalikes.max() <= PER_SERVICE, lookalikes[lookalikes > PER_SERVICE]
    tickets = table(store, "support_tickets")
    assert not tickets[tickets["status"] == "open"].duplicated("device_id").any()  # one per fault
    return offers


def fullest_weeks(offers: pd.DataFrame) -> pd.Series:
    """Per device, its offers in the fullest 7 days in a row."""
    days = pd.to_datetime(offers["offer_day"])
    counts = []
    for end in days.drop_duplicates():
        week = offers[(days > end - pd.Timedelta(days=7)) & (days <= end)]
        counts.append(week.groupby("device_id").size())
    return pd.concat(counts).groupby(level=0).max() if counts else pd.Series(dtype="int64")


def test_re_running_the_offers_of_a_day_after_feedback_and_re_clustering_keeps_every_limit(
    fleet, whole_fleet_budget
):
    store = resources_for(fleet.home)["persona_store"]
    before = assert_within_the_days_limits(store)
    day = before["offer_day"].max()
    tickets_before = table(store, "support_tickets", order_by=["ticket_id"])
    assert len(tickets_before) > 0
    # The same day, the same inputs and settings.
    assert offers_and_tickets_new(fleet.home) == (0, 0)
    # From here, the fleet's budget no longer binds: what is checked is every other limit.
    config = whole_fleet_budget

    assert respond(store, "a", accept_share=0.5, seed=1) > 0
    first = offers_new(fleet.home, config=config)
    after_feedback = assert_within_the_days_limits(store)
    assert first > 0 and (after_feedback["trigger"] == "lookalike").any()
    # The same inputs again: no further lookalikes.
    assert offers_new(fleet.home, config=config) == 0
    assert len(table(store, "service_recommendations")) == len(after_feedback)

    # More accepting devices, so other examples for the query; then segments re-formed first.
    respond(store, "b", accept_share=0.8, seed=2)
    offers_new(fleet.home, config=config)
    assert_within_the_days_limits(store)
    offers_new(fleet.home, segments, device_clusters, anomaly_scores, config=config)
    offers_new(fleet.home, segments, device_clusters, anomaly_scores, config=config)
    offers = assert_within_the_days_limits(store)
    assert offers_and_tickets_new(fleet.home, config=config) == (0, 0)

    # Earlier days' offers are never touched by a re-run of the last one.
    earlier = before[before["offer_day"] < day].set_index("offer_id")
    assert offers.set_index("offer_id").loc[earlier.index, "score"].equals(earlier["score"])
    tickets = table(store, "support_tickets", order_by=["ticket_id"])
    assert (
        tickets.set_index("ticket_id")
        .loc[tickets_before["ticket_id"], "created_at"]
        .equals(tickets_before.set_index("ticket_id")["created_at"])
    )


def test_the_lookalike_examples_are_the_first_devices_in_the_order_the_offers_were_made(resources):
    """The query takes each service's first accepting (and other) devices as examples, so the
    order is the offers' (run, then device), not whatever order the database returns a join in;
    a device offered the service again keeps the place of its first answered offer. The counts
    are of every answered offer."""
    store = resources["persona_store"]
    devices = [f"dev-{(7 * i) % 12:02d}" for i in range(12)] + ["dev-11", "dev-05", "dev-00", "dev-03"]
    made = pd.DataFrame(
        {
            "offer_id": [f"offer-{i:02d}" for i in range(16)],
            "device_id": devices,
            "service_id": ["car_mount"] * 12 + ["car_mount", "car_mount", "headphones", "headphones"],
            "trigger": "usage",
            "score": 0.5,
            "reason": "test",
            "created_at": pd.Timestamp("2026-03-07T10:00Z") + pd.to_timedelta(np.arange(16) // 4, unit="h"),
            "offer_day": DAY,
            "priority": 0.4,
        }
    )
    answers = pd.DataFrame(
        {
            "batch_id": "a",
            "offer_id": made["offer_id"],
            "response": np.where(np.arange(16) % 3 == 0, "rejected", "accepted"),
            "responded_at": pd.Timestamp("2026-03-08T10:00Z"),
            "source_file": "a/part-0.jsonl",
            "source_row": np.arange(1, 17),
        }
    )
    with store.begin() as connection:  # stored in neither order
        store.insert_frame(connection, service_recommendations_table, made.iloc[::-1])
        store.insert_frame(connection, offer_feedback, answers.sample(frac=1.0, random_state=3))

    answered = made.assign(accepted=answers["response"].to_numpy() == "accepted")
    in_order = answered.sort_values(["created_at", "device_id", "offer_id"])
    for per_service in (3, 20):
        known = offers_storage.read_lookalike_examples(store, per_service)
        for service in ("car_mount", "headphones"):
            for accepted in (True, False):
                rows = in_order[(in_order["service_id"] == service) & (in_order["accepted"] == accepted)]
                expected = rows["device_id"].unique()[:per_service].tolist()
                found = known.examples.query("service_id == @service and accepted == @accepted")
                assert found["device_id"].tolist() == expected, (per_service, service, accepted)
                assert found["rank"].tolist() == list(range(len(expected)))
    counts = known.responses.set_index("service_id")
    assert counts.loc["car_mount"].tolist() == [
        14,
        int(answered.query("service_id == 'car_mount'")["accepted"].sum()),
    ]
    assert counts.loc["headphones"].tolist() == [
        2,
        int(answered.query("service_id == 'headphones'")["accepted"].sum()),
    ]


def made_offers(history: pd.DataFrame | None = None) -> pd.DataFrame:
    """The offers of `inputs()` as the asset writes them (recommended against `history`)."""
    chosen = inputs() if history is None else inputs(history=history)
    return recommend(chosen, CATALOG).assign(created_at=pd.Timestamp("2026-03-07T12:00Z"))


def test_writing_counts_the_offers_another_run_stored_since_this_one_read_its_history(resources):
    """Two runs of the day read the same (empty) history; the second to write finds the first's
    offers in the table and adds only what fits under each device's cap."""
    store = resources["persona_store"]
    earlier_run = pd.DataFrame(
        {
            "offer_id": ["offer-1", "offer-2", "offer-3"],
            "device_id": "sick",
            "service_id": ["car_mount", "headphones", "smartwatch"],
            "trigger": "lookalike",
            "score": 0.2,
            "reason": "close in persona",
            "created_at": pd.Timestamp("2026-03-07T11:00Z"),
            "offer_day": DAY,
            "priority": 0.4,
        }
    )
    catalog = uncapped(daily_cap=CAP)  # the weekly budget would allow only two of the three
    assert len(offers_storage.write_offers(store, earlier_run, DAY, catalog)) == 3
    stale = made_offers()  # made without knowing the three above
    assert "sick" in set(stale["device_id"])
    written = offers_storage.write_offers(store, stale, DAY, catalog)
    assert "sick" not in set(written["device_id"]) and len(written) > 0
    offers = table(store, "service_recommendations")
    assert offers.groupby("device_id").size().max() <= CAP
    assert set(offers["offer_id"]) == set(earlier_run["offer_id"]) | set(written["offer_id"])


def test_other_writers_wait_while_a_run_checks_and_writes_its_offers(resources, monkeypatch):
    """Between reading what is stored for the day and inserting, no other connection can write
    the table (it would have to wait), so the cap checked is the cap written."""
    store = resources["persona_store"]
    attempts: list[Exception] = []
    checked = offers_storage.within_limits

    def check_while_another_writes(offers, stored, day, catalog, fleet_devices=None):
        other = sa.create_engine(
            store.resolved_url, connect_args={"timeout": 0} if "sqlite" in store.resolved_url else {}
        )
        try:
            with other.begin() as connection:
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        sa.text("LOCK TABLE service_recommendations IN ROW EXCLUSIVE MODE NOWAIT")
                    )
                store.insert_frame(connection, service_recommendations_table, made_offers().head(1))
        except sa.exc.OperationalError as error:
            attempts.append(error)
        finally:
            other.dispose()
        return checked(offers, stored, day, catalog, fleet_devices)

    monkeypatch.setattr(offers_storage, "within_limits", check_while_another_writes)
    written = offers_storage.write_offers(store, made_offers(), DAY, CATALOG)
    assert len(attempts) == 1  # the other writer could not write
    assert len(table(store, "service_recommendations")) == len(written) > 0
