"""The assets through Dagster, on a real instance with SQLite and a local Qdrant path."""

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.app.runner import RANGE_END_TAG, RANGE_START_TAG
from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.feedback.assets import key_weights
from persona_pipeline.ingest.assets import REJECT_SHARE_CHECK, index_updates
from persona_pipeline.personas import assets as personas_assets
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.assets import (
    ONE_POINT_CHECK,
    device_profiles,
    persona_index,
    persona_vectors,
)
from persona_pipeline.resources.vector_index import StoredPoint, point_id
from persona_pipeline.store.tables import persona_vectors as persona_vectors_table
from persona_pipeline_tests.conftest import (
    ENGINES,
    accepted_updates,
    check_named,
    store_url,
    table,
    update,
    write_jsonl,
)

# key_weights records the configured weights the vectors are built with.
VECTOR_ASSETS = [key_weights, persona_vectors, persona_index]

INGEST = [index_updates, device_profiles]
DAYS = ["2026-03-01", "2026-03-02", "2026-03-03"]


def day_rows(day: str, n: int = 3) -> list[dict]:
    """Every day reports each device; later days overwrite some values, some keys go quiet."""
    index = DAYS.index(day)
    rows = []
    for d in range(n):
        rows.append(
            update(
                f"d{d}",
                "device.location.city",
                ["Berlin", "Munich", "Paris"][(d + index) % 3],
                f"{day}T1{d}:00:00Z",
                customer=f"c{d}",
            )
        )
        rows.append(
            update(
                f"d{d}",
                "device.usage.app_maps_duration",
                600 * (index + 1) * (d + 1),
                f"{day}T12:00:00Z",
            )
        )
        if index == d:
            rows.append(update(f"d{d}", "device.health.crash_count", index, f"{day}T13:00:00Z"))
    # A late update for day 1 arriving with day 3: it must not overwrite newer values.
    if index == 2:
        rows.append(update("d0", "device.location.city", "Vienna", "2026-03-01T23:00:00Z"))
    return rows


def materialize(assets, resources, instance, **kwargs) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, resources=resources, instance=instance, **kwargs)


def profiles_after(order: list[str], landing, resources, instance) -> pd.DataFrame:
    for day in DAYS:
        write_jsonl(landing, day, day_rows(day))
    for day in order:
        assert materialize(INGEST, resources, instance, partition_key=day).success
    return table(resources["persona_store"], "device_profiles", ["device_id", "key"])


@pytest.mark.parametrize(
    "order",
    [
        ["2026-03-03", "2026-03-01", "2026-03-02"],
        ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-02"],
    ],
)
def test_profiles_do_not_depend_on_partition_order_or_repeats(order, landing, resources, instance, tmp_path):
    got = profiles_after(order, landing, resources, instance)
    reference_home = tmp_path / "reference"
    reference = {
        **resources,
        "persona_store": type(resources["persona_store"])(url=store_url(reference_home)),
    }
    with dg.instance_for_test() as other:
        expected = profiles_after(DAYS, landing, reference, other)
    pd.testing.assert_frame_equal(got, expected)
    city = got.set_index(["device_id", "key"]).loc[("d0", "device.location.city"), "value"]
    assert city == "Paris"  # the day-3 value, not the late day-1 "Vienna"


def per_partition(result: dg.ExecuteInProcessResult, asset: str, label: str) -> dict[str, int]:
    """`label`'s value on each partition's materialization of `asset` in `result`."""
    return {
        event.partition: event.metadata[label].value
        for event in result.asset_materializations_for_node(asset)
    }


def test_range_run_equals_day_by_day(landing, resources, instance, tmp_path):
    for day in DAYS:
        write_jsonl(landing, day, day_rows(day))
    result = materialize(
        INGEST,
        resources,
        instance,
        tags={RANGE_START_TAG: DAYS[0], RANGE_END_TAG: DAYS[-1]},
    )
    assert result.success
    ranged = table(resources["persona_store"], "device_profiles", ["device_id", "key"])
    updates = accepted_updates(resources["persona_store"])
    assert sorted(updates["partition_date"].unique()) == DAYS
    # Each partition's materialization shows its own counts, not the range's.
    accepted = per_partition(result, "index_updates", "rows_accepted")
    assert accepted == updates["partition_date"].value_counts().to_dict()
    assert sorted(accepted) == DAYS and all(count < len(updates) for count in accepted.values())
    read = per_partition(result, "device_profiles", "updates_read")
    assert read == accepted

    day_by_day = {
        **resources,
        "persona_store": type(resources["persona_store"])(url=store_url(tmp_path / "day_by_day")),
    }
    with dg.instance_for_test() as other:
        for day in DAYS:
            assert materialize(INGEST, day_by_day, other, partition_key=day).success
    pd.testing.assert_frame_equal(
        ranged, table(day_by_day["persona_store"], "device_profiles", ["device_id", "key"])
    )


def test_mixed_file_reaches_profiles_and_rejects_and_reports_metadata(landing, resources, instance):
    at = "2026-03-01T10:00:00Z"
    rows = [
        update("d1", "device.location.city", "Berlin", at),
        update("", "device.location.city", "Berlin", at),
        update("d1", "device.usage.app_maps_duration", "a lot", at),
        update("d2", "device.usage.app_maps_duration", 5400, at),
        update("d2", "device.os.build", "AP2A", at),
    ]
    write_jsonl(landing, "2026-03-01", rows)
    result = materialize(INGEST, resources, instance, partition_key="2026-03-01")
    assert result.success
    store = resources["persona_store"]
    profiles = table(store, "device_profiles", ["device_id", "key"])
    assert list(zip(profiles["device_id"], profiles["key"], strict=True)) == [
        ("d1", "device.location.city"),
        ("d2", "device.os.build"),
        ("d2", "device.usage.app_maps_duration"),
    ]
    rejects = table(store, "index_update_rejects", ["source_row"])
    assert rejects["reason"].tolist() == [
        "device_id is missing or empty",
        "value 'a lot' is not a number (device.usage.app_maps_duration is numeric)",
    ]
    assert rejects["source_row"].tolist() == [2, 3]

    metadata = result.asset_materializations_for_node("index_updates")[0].metadata
    assert metadata["rows_read"].value == 5
    assert metadata["rows_accepted"].value == 3
    assert metadata["rows_rejected"].value == 2
    assert metadata["unknown_key_rows"].value == 1
    assert metadata["devices"].value == 2
    check = check_named(result, REJECT_SHARE_CHECK)
    assert check.check_name == REJECT_SHARE_CHECK
    assert not check.passed  # 2 of 5 rejected > 5%

    # Re-ingesting the same day replaces its rows instead of adding to them.
    assert materialize(INGEST, resources, instance, partition_key="2026-03-01").success
    assert len(table(store, "index_update_rejects")) == 2
    assert len(accepted_updates(store)) == 3


def test_reject_check_passes_under_the_threshold_and_threshold_is_configurable(landing, resources, instance):
    rows = [update(f"d{i}", "device.location.city", "Berlin", "2026-03-01T10:00:00Z") for i in range(19)]
    rows.append(update("", "device.location.city", "Berlin", "2026-03-01T10:00:00Z"))
    write_jsonl(landing, "2026-03-01", rows)
    result = materialize([index_updates], resources, instance, partition_key="2026-03-01")
    assert check_named(result, REJECT_SHARE_CHECK).passed  # exactly 5%
    strict = dg.RunConfig(ops={"index_updates": {"config": {"max_reject_share": 0.01}}})
    result = materialize([index_updates], resources, instance, partition_key="2026-03-01", run_config=strict)
    assert not check_named(result, REJECT_SHARE_CHECK).passed


def index_points(resources) -> tuple[str, dict[str, StoredPoint]]:
    vector_index = resources["vector_index"]
    with vector_index.open() as index:
        collection = index.alias_target(vector_index.alias)
        points = list(index.scroll(vector_index.alias, with_vectors=True))
    return collection, {p.payload["device_id"]: p for p in points}


@pytest.mark.parametrize("embedded_engine", ENGINES)
def test_vectors_land_in_qdrant_once_per_device_and_rewrites_follow_changes(landing, resources, instance):
    for day in DAYS:
        write_jsonl(landing, day, day_rows(day, n=5))
        assert materialize(INGEST, resources, instance, partition_key=day).success
    result = materialize(VECTOR_ASSETS, resources, instance)
    assert result.success
    collection, points = index_points(resources)
    assert collection.startswith("personas_")
    assert sorted(points) == [f"d{i}" for i in range(5)]
    assert {str(p.id) for p in points.values()} == {point_id(f"d{i}") for i in range(5)}
    assert points["d1"].payload["customer_id"] == "c1"
    assert points["d1"].payload["weights_version"] == 1
    assert check_named(result, ONE_POINT_CHECK).passed

    again = materialize(VECTOR_ASSETS, resources, instance)
    assert (
        again.asset_materializations_for_node("persona_vectors")[0].metadata["devices_rewritten"].value == 0
    )
    assert again.asset_materializations_for_node("persona_index")[0].metadata["points_written"].value == 0

    write_jsonl(
        landing,
        "2026-03-03",
        [update("d4", "device.location.city", "Zurich", "2026-03-03T20:00:00Z")],
        name="late.jsonl",
    )
    assert materialize(INGEST, resources, instance, partition_key="2026-03-03").success
    changed = materialize(VECTOR_ASSETS, resources, instance)
    assert (
        changed.asset_materializations_for_node("persona_vectors")[0].metadata["devices_rewritten"].value == 1
    )
    assert changed.asset_materializations_for_node("persona_index")[0].metadata["points_written"].value == 1
    _, points = index_points(resources)
    assert len(points) == 5
    # A device whose profiles name no customer (d4, after its late update) carries null, not NaN.
    assert {d: p.payload["customer_id"] for d, p in points.items()} == {
        "d0": "c0",
        "d1": "c1",
        "d2": "c2",
        "d3": "c3",
        "d4": None,
    }
    names = resources["persona_config"].feature_schema().dimension_names
    assert points["d4"].vector[names.index("device.location.city=Zurich")] == pytest.approx(0.3)


@pytest.mark.parametrize("embedded_engine", ENGINES)
def test_new_weights_version_fills_a_new_collection_then_swaps_the_alias(landing, resources, instance):
    from persona_pipeline.personas.weights import current_weights, insert_weights

    write_jsonl(landing, DAYS[0], day_rows(DAYS[0], n=4))
    assert materialize(INGEST, resources, instance, partition_key=DAYS[0]).success
    assert materialize(VECTOR_ASSETS, resources, instance).success
    first, _ = index_points(resources)

    store = resources["persona_store"]
    learned = {
        **current_weights(store).weights,
        "device.location.city": 0.4,
    }
    insert_weights(store, 2, learned, "feedback")
    result = materialize(VECTOR_ASSETS, resources, instance)
    assert result.success
    second, points = index_points(resources)
    assert second != first and second.endswith("-w2")
    assert {p.payload["weights_version"] for p in points.values()} == {2}
    metadata = result.asset_materializations_for_node("persona_index")[0].metadata
    assert metadata["previous_collection"].value == first
    assert metadata["points_written"].value == 4
    with resources["vector_index"].open() as index:
        assert index.count(first) == 4  # kept for a rollback
    weights = table(store, "key_weights")
    assert sorted(weights["source"].unique()) == ["config", "feedback"]


def test_vectors_of_a_day_follow_the_devices_that_changed_and_equal_a_full_recompute(
    landing, resources, instance
):
    store = resources["persona_store"]
    moved_long_ago = update("d3", "device.location.city", "Madrid", "2026-03-01T21:00:00Z")
    first = [
        *[update(f"d{d}", "device.location.city", "Berlin", "2026-03-01T10:00:00Z") for d in range(20)],
        moved_long_ago,  # within 7 days of 2026-03-08T20:00, not of 2026-03-09T20:00
        *[update(f"d{d}", "device.battery.level", 50 + d, "2026-03-08T20:00:00Z") for d in range(20)],
    ]
    write_jsonl(landing, "2026-03-08", first)
    assert materialize(INGEST, resources, instance, partition_key="2026-03-08").success
    full = materialize([key_weights, persona_vectors], resources, instance).asset_materializations_for_node(
        "persona_vectors"
    )[0]
    assert full.metadata["computed"].value == "every device"
    assert full.metadata["moved_recently"].value == 1  # d3

    write_jsonl(
        landing,
        "2026-03-09",
        [
            update("d1", "device.location.city", "Paris", "2026-03-09T09:00:00Z"),
            update("d2", "device.battery.level", 90, "2026-03-09T20:00:00Z"),
        ],
    )
    assert materialize(INGEST, resources, instance, partition_key="2026-03-09").success
    day = materialize([key_weights, persona_vectors], resources, instance).asset_materializations_for_node(
        "persona_vectors"
    )[0]
    # d1 and d2 sent updates; d3 sent nothing, but its move is now more than 7 days old.
    assert day.metadata["computed"].value == "the devices whose vector may have changed"
    assert day.metadata["devices_computed"].value == 3
    assert day.metadata["devices_rewritten"].value == 3
    assert day.metadata["devices"].value == 20
    assert day.metadata["moved_recently"].value == 1  # d1
    assert table(store, "profile_changes").empty

    with store.begin() as connection:  # no run on record (an erasure): a full recompute changes nothing
        connection.execute(sa.text("delete from persona_vector_runs"))
    again = materialize([key_weights, persona_vectors], resources, instance).asset_materializations_for_node(
        "persona_vectors"
    )[0]
    assert again.metadata["computed"].value == "every device"
    assert again.metadata["devices_rewritten"].value == 0


def test_the_merge_check_sees_values_that_did_not_land(landing, resources, instance, monkeypatch):
    from persona_pipeline.personas import storage as persona_storage
    from persona_pipeline.personas.assets import MERGED_CHECK

    write_jsonl(landing, DAYS[0], day_rows(DAYS[0]))
    landed = materialize(INGEST, resources, instance, partition_key=DAYS[0])
    assert check_named(landed, MERGED_CHECK).passed
    write_jsonl(landing, DAYS[1], day_rows(DAYS[1]))
    real_merge = persona_storage.merge_into_profiles
    # A merge that loses the newest value of every other row.
    monkeypatch.setattr(
        persona_storage, "merge_into_profiles", lambda store, latest: real_merge(store, latest.iloc[::2])
    )
    lost = materialize(INGEST, resources, instance, partition_key=DAYS[1])
    check = check_named(lost, MERGED_CHECK)
    assert not check.passed and check.metadata["values_missing_or_older"].value > 0


def test_vectors_computed_a_page_of_profiles_at_a_time_equal_one_page(
    landing, resources, instance, monkeypatch
):
    """Pages of 4 profile rows cut inside devices (d0 alone has more rows than a page): the
    vectors, the fingerprints and the metadata equal those of one page, and a device whose
    profile is gone loses its vector."""
    store = resources["persona_store"]
    keys = [
        ("device.location.city", lambda d: ["Berlin", "Paris", "Rome"][d % 3]),
        ("device.battery.level", lambda d: 20 + 7 * d),
        ("device.usage.app_maps_duration", lambda d: 600 * d),
        ("device.health.crash_count", lambda d: d % 4),
        ("device.connection.signal_strength", lambda d: -60 - d),
        ("device.usage.app_podcast_duration", lambda d: 300 * d),
    ]
    rows = [
        update(f"d{d}", key, value(d), "2026-03-08T10:00:00Z", customer=f"c{d % 5}")
        for d in range(12)
        for key, value in keys[: 6 if d == 0 else 1 + d % 4]
    ]
    write_jsonl(landing, "2026-03-08", rows)
    assert materialize(INGEST, resources, instance, partition_key="2026-03-08").success

    def vectors_and_metadata() -> tuple[pd.DataFrame, dict]:
        result = materialize([key_weights, persona_vectors], resources, instance)
        metadata = result.asset_materializations_for_node("persona_vectors")[0].metadata
        vectors = table(store, "persona_vectors", ["device_id"]).drop(columns=["computed_at"])
        return vectors, {name: value.value for name, value in metadata.items()}

    one_page, one_page_metadata = vectors_and_metadata()
    assert len(one_page) == 12 and one_page_metadata["computed"] == "every device"
    for shard in (None, DeviceShard(0, 3), DeviceShard(2, 3)):
        whole = persona_storage.read_profiles(store, shard=shard).sort_values(["device_id", "key"])
        for rows_per_page in (1, 4, 6, 7, 50):
            pages = list(persona_storage.read_profile_pages(store, shard, rows_per_page))
            devices = [set(page["device_id"]) for page in pages]
            assert sum(len(d) for d in devices) == len(set().union(*devices)), (shard, rows_per_page)
            joined = pd.concat(pages, ignore_index=True) if pages else whole.iloc[0:0]
            pd.testing.assert_frame_equal(joined.reset_index(drop=True), whole.reset_index(drop=True))
    with store.begin() as connection:
        connection.execute(sa.text("delete from persona_vector_runs"))
        connection.execute(sa.text("delete from persona_vectors"))
    gone = one_page.iloc[[0]].assign(device_id="gone")
    with store.begin() as connection:
        store.insert_frame(
            connection, persona_vectors_table, gone.assign(computed_at=pd.Timestamp.now(tz="UTC"))
        )

    monkeypatch.setattr(personas_assets, "PROFILE_PAGE_ROWS", 4)
    paged, paged_metadata = vectors_and_metadata()

    pd.testing.assert_frame_equal(paged, one_page)
    assert paged_metadata["devices_removed"] == 1
    assert paged_metadata["devices_rewritten"] == 12
    for name in ("devices", "devices_computed", "dimension_weights", "moved_recently", "computed"):
        assert paged_metadata[name] == one_page_metadata[name], name


def test_a_rebuild_in_pages_shows_other_readers_one_feature_space_until_it_ends(
    landing, resources, instance, monkeypatch
):
    """New weights rebuild every vector, a page at a time: until the run ends, a reader (the
    segments, the scores, the index, which refuse a table of two spaces) sees the old space."""
    store = resources["persona_store"]
    rows = [update(f"d{d}", "device.battery.level", 20 + d, "2026-03-08T10:00:00Z") for d in range(9)]
    write_jsonl(landing, "2026-03-08", rows)
    assert materialize(INGEST, resources, instance, partition_key="2026-03-08").success
    assert materialize([key_weights, persona_vectors], resources, instance).success
    with store.begin() as connection:
        connection.execute(
            sa.text("update persona_vectors set space = 'old-space', fingerprint = fingerprint + 1")
        )
        connection.execute(sa.text("delete from persona_vector_runs"))

    seen = []
    real_build = personas_assets.build_persona_vectors

    def build_and_look(*args, **kwargs):
        seen.append(persona_storage.read_vector_spaces(store))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(personas_assets, "PROFILE_PAGE_ROWS", 2)
    monkeypatch.setattr(personas_assets, "build_persona_vectors", build_and_look)
    assert materialize([persona_vectors], resources, instance).success

    assert len(seen) > 2 and all(spaces == ["old-space"] for spaces in seen), seen
    assert persona_storage.read_vector_spaces(store) != ["old-space"]
    assert len(persona_storage.read_vector_spaces(store)) == 1
