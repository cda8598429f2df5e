"""Cooldowns longer than the week the offers step reads whole: the last contact of each
candidate (device, service) is found in the store, for the day's candidates alone, and it
equals what the whole history says."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from persona_pipeline.offers import storage as offers_storage
from persona_pipeline.offers.assets import service_recommendations
from persona_pipeline.offers.recommend import last_contacts
from persona_pipeline.store.tables import offer_feedback
from persona_pipeline.store.tables import service_recommendations as offers_table
from persona_pipeline_tests.conftest import evaluated_fleet, resources_for, table

DAY = "2026-03-10"
SINCE = "2025-12-10"  # the longest cooldown (90 days) before DAY


def offer(device: str, service: str, day: str) -> dict:
    return {
        "offer_id": f"offer-{device}-{service}-{day}",
        "device_id": device,
        "service_id": service,
        "trigger": "usage",
        "score": 0.5,
        "reason": "test",
        "created_at": pd.Timestamp(day, tz="UTC"),
        "offer_day": day,
        "priority": 0.5,
    }


def answer(offer_id: str, response: str, at: str, batch: str = "batch-1") -> dict:
    return {
        "batch_id": batch,
        "offer_id": offer_id,
        "response": response,
        "responded_at": pd.Timestamp(at, tz="UTC"),
        "source_file": f"{batch}/part-0.jsonl",
        "source_row": 1,
    }


OFFERS = pd.DataFrame(
    [
        offer("a", "maps", "2026-03-09"),  # the last contact
        offer("a", "maps", "2026-02-01"),
        offer("a", "mount", "2025-12-01"),  # before the longest cooldown: no contact
        offer("b", "mount", DAY),  # today's offer is not a contact
        offer("b", "mount", "2026-03-12"),  # nor a later day's
        offer("c", "phones", "2026-01-15"),  # rejected, then accepted: the offer day
        offer("d", "phones", "2026-01-15"),  # accepted, then rejected after DAY: the rejection
        offer("e", "watch", "2026-03-01"),  # not a candidate
        offer("f", "mount", "2025-12-05"),  # rejected since, but offered before the window
        offer("g", "mount", "2026-02-01"),  # two answers at one instant: batch b's, accepted, is the latest
        offer("h", "mount", "2026-01-20"),  # rejected on 2026-03-02, later than its offer
    ]
)
ANSWERS = pd.DataFrame(
    [
        answer("offer-c-phones-2026-01-15", "rejected", "2026-02-20"),
        answer("offer-c-phones-2026-01-15", "accepted", "2026-02-25", batch="batch-2"),
        answer("offer-d-phones-2026-01-15", "accepted", "2026-02-01"),
        answer("offer-d-phones-2026-01-15", "rejected", "2026-03-11T08:00", batch="batch-2"),
        answer("offer-f-mount-2025-12-05", "rejected", "2026-03-01"),
        answer("offer-g-mount-2026-02-01", "rejected", "2026-02-03", batch="a"),
        answer("offer-g-mount-2026-02-01", "accepted", "2026-02-03", batch="b"),
        answer("offer-h-mount-2026-01-20", "rejected", "2026-03-02"),
    ]
)
CANDIDATES = pd.DataFrame(
    {
        "device_id": ["a", "a", "b", "c", "d", "f", "g", "h", "new"],
        "service_id": ["maps", "mount", "mount", "phones", "phones", "mount", "mount", "mount", "maps"],
        "trigger": "usage",
    }
)
EXPECTED = {
    ("a", "maps"): "2026-03-09",
    ("c", "phones"): "2026-01-15",
    ("d", "phones"): "2026-03-11",
    ("g", "mount"): "2026-02-01",
    ("h", "mount"): "2026-03-02",
}


@pytest.mark.parametrize("join_in_database", [True, False, None], ids=["joined", "matched", "chosen"])
def test_the_last_contacts_of_the_candidates_are_read_from_the_store(resources, join_in_database):
    store = resources["persona_store"]
    with store.begin() as connection:
        store.insert_frame(connection, offers_table, OFFERS)
        store.insert_frame(connection, offer_feedback, ANSWERS)
    found = offers_storage.read_last_contacts(store, CANDIDATES, DAY, SINCE, join_in_database)
    assert dict(
        zip(zip(found["device_id"], found["service_id"], strict=True), found["last_day"], strict=True)
    ) == (EXPECTED)
    # The same as the whole history says (offers since the window, rejections that are the
    # latest answer), for the candidates.
    in_window = OFFERS[OFFERS["offer_day"] >= SINCE]
    rejections = pd.DataFrame(
        {
            "device_id": ["d", "h"],
            "service_id": ["phones", "mount"],
            "rejected_day": ["2026-03-11", "2026-03-02"],
        }
    )
    whole = last_contacts(in_window, rejections, DAY)
    wanted = whole.merge(CANDIDATES[["device_id", "service_id"]])
    assert (
        wanted.sort_values(["device_id", "service_id"])
        .reset_index(drop=True)
        .equals(found.sort_values(["device_id", "service_id"]).reset_index(drop=True))
    )
    # Nothing is left behind in the store, and a second read finds the same.
    again = offers_storage.read_last_contacts(store, CANDIDATES, DAY, SINCE, join_in_database)
    assert (
        again.sort_values(["device_id", "service_id"])
        .reset_index(drop=True)
        .equals(found.sort_values(["device_id", "service_id"]).reset_index(drop=True))
    )


@pytest.mark.store_agnostic
def test_no_candidates_read_no_contacts(resources):
    assert offers_storage.read_last_contacts(
        resources["persona_store"], CANDIDATES.iloc[0:0], DAY, SINCE
    ).empty


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    yield from evaluated_fleet(tmp_path_factory.mktemp("cooldowns"), devices=300, days=3, seed=5)


def test_an_offer_older_than_the_week_still_cools_its_service_down(fleet):
    """The last day's offers are moved 10 days back, out of the week the step reads whole: a
    service whose cooldown is longer is not offered to the device again when the day is run
    anew."""
    resources = resources_for(fleet.home)
    store = resources["persona_store"]
    offers = table(store, "service_recommendations")
    day = offers["offer_day"].max()
    last_day = offers[offers["offer_day"] == day]
    moved_back = (pd.Timestamp(day) - pd.Timedelta(days=10)).strftime("%Y-%m-%d")
    with store.begin() as connection:
        connection.execute(
            offers_table.update()
            .where(offers_table.c.offer_day == day)
            # An offer's id is a hash of its day: the moved ones must not hold today's ids.
            .values(offer_day=moved_back, offer_id=offers_table.c.offer_id + "-moved")
        )
    with dg.instance_for_test() as instance:
        dg.materialize([service_recommendations], resources=resources, instance=instance)
    again = table(store, "service_recommendations").query("offer_day == @day")
    cooldown = {
        s.id.split(":")[0]: s.cooldown_days
        for s in resources["persona_config"].service_catalog().spec.services
    }
    longer = last_day[last_day["service_id"].str.split(":").str[0].map(cooldown) > 10]
    assert len(longer) > 0 and len(again) > 0
    repeated = again.merge(longer[["device_id", "service_id"]])
    assert repeated.empty, repeated.head()


def test_a_read_that_failed_midway_leaves_the_next_one_working(resources, monkeypatch):
    """SQLite creates the temporary table outside the transaction: a read that fails after it
    must not leave it behind for the next read on the pooled connection."""
    store = resources["persona_store"]
    with store.begin() as connection:
        store.insert_frame(connection, offers_table, OFFERS)
    real_read = type(store).read_frame
    failed = []

    def fail_once(self, query, connection=None):
        if not failed:
            failed.append(query)
            raise RuntimeError("the store went away")
        return real_read(self, query, connection)

    monkeypatch.setattr(type(store), "read_frame", fail_once)
    with pytest.raises(RuntimeError, match="went away"):
        offers_storage.read_last_contacts(store, CANDIDATES, DAY, SINCE, join_in_database=True)
    found = offers_storage.read_last_contacts(store, CANDIDATES, DAY, SINCE, join_in_database=True)
    assert ("a", "maps", "2026-03-09") in set(found.itertuples(index=False, name=None))


@pytest.mark.parametrize(("pairs", "joined"), [(3, True), (9, False)])
def test_the_database_joins_the_pairs_when_more_offers_were_made_since_the_window_began(
    resources, monkeypatch, pairs, joined
):
    """9 offers were made since SINCE: 3 pairs are joined in the database, 9 matched in memory;
    either way the contacts are those of the pairs."""
    store = resources["persona_store"]
    with store.begin() as connection:
        store.insert_frame(connection, offers_table, OFFERS)
        store.insert_frame(connection, offer_feedback, ANSWERS)
    inserted = []
    real_insert = type(store).insert_frame

    def spy(connection, table, frame):
        inserted.append(table.name)
        return real_insert(connection, table, frame)

    monkeypatch.setattr(type(store), "insert_frame", staticmethod(spy))
    wanted = CANDIDATES.head(pairs)
    found = offers_storage.read_last_contacts(store, wanted, DAY, SINCE)

    assert ("offer_pairs_wanted" in inserted) is joined
    expected = {
        pair: day
        for pair, day in EXPECTED.items()
        if pair in set(zip(wanted["device_id"], wanted["service_id"], strict=True))
    }
    assert (
        dict(zip(zip(found["device_id"], found["service_id"], strict=True), found["last_day"], strict=True))
        == expected
    )
