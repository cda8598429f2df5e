"""segments, device_clusters and anomaly_scores through Dagster, on the demo fleet (generator seed 7)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from persona_pipeline.anomalies.assets import RATE_CHECK, anomaly_scores
from persona_pipeline.app.evaluate import DEMO_TARGETS
from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.offers.recommend import explores
from persona_pipeline.personas.assets import persona_index
from persona_pipeline.resources import PersonaConfig, VectorIndex
from persona_pipeline.resources.vector_index import VectorIndexError, VectorStore
from persona_pipeline.segments.assets import STABILITY_CHECK, device_clusters, segments
from persona_pipeline.segments.reporting import ASSIGNED_CHECK, assigned_check
from persona_pipeline.segments.vector_payloads import sync_cluster_payloads
from persona_pipeline.service_catalog import load_service_catalog
from persona_pipeline.store.tables import metadata as store_metadata
from persona_pipeline_tests.conftest import evaluated_fleet, resources_for, table


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo fleet of `make demo` (3,000 devices, 7 days, seed 7)."""
    yield from evaluated_fleet(tmp_path_factory.mktemp("demo"), devices=3000, days=7, seed=7)


# A full fit, not the assignment of changed devices between fits.
REFIT = {"ops": {"segments": {"config": {"refit": True}}}}
FIT_AND_ASSIGN = [segments, device_clusters]


def cluster_payloads(home: Path) -> dict[str, int | None]:
    with resources_for(home)["vector_index"].open() as index:
        return {p.payload["device_id"]: p.payload.get("cluster_id") for p in index.scroll("personas")}


def test_demo_fleet_failing_devices_are_found_through_the_assets(demo):
    combined = demo.table.iloc[-1]
    assert combined["method"].startswith("calibrated")  # the stored score, now from p-values
    assert demo.planted == 46
    assert combined["roc_auc"] >= DEMO_TARGETS["roc_auc"]
    assert combined["precision_at_planted"] >= DEMO_TARGETS["precision_at_planted"]
    assert 0.002 <= demo.flagged / demo.devices <= 0.05


def test_reclustering_an_unchanged_fleet_keeps_every_cluster_id(demo):
    resources = resources_for(demo.home)
    store = resources["persona_store"]
    before = table(store, "device_clusters", order_by=["device_id"])
    registry_before = table(store, "segments", order_by=["cluster_id"])
    with dg.instance_for_test() as instance:
        result = dg.materialize(FIT_AND_ASSIGN, resources=resources, instance=instance, run_config=REFIT)
    after = table(store, "device_clusters", order_by=["device_id"])
    assert len(after) == 3000
    assert after["cluster_id"].tolist() == before["cluster_id"].tolist()
    assert after["distance"].tolist() == before["distance"].tolist()
    metadata = result.asset_materializations_for_node("segments")[0].metadata
    assert metadata["devices_reassigned"].value == 0 and metadata["devices_fitted"].value == 3000
    assert metadata["segments_new"].value == 0 and metadata["segments_retired"].value == "none"
    assigned = result.asset_materializations_for_node("device_clusters")[0].metadata
    assert assigned["devices_assigned"].value == 3000  # every device joins the new fit
    assert assigned["payloads_written"].value == 0  # nothing changed, nothing rewritten
    registry = table(store, "segments", order_by=["cluster_id"])
    assert registry["cluster_id"].tolist() == registry_before["cluster_id"].tolist()
    assert registry["active"].all()
    # The Qdrant payload carries the same segment as the table, for every point.
    payloads = cluster_payloads(demo.home)
    assert payloads == dict(zip(after["device_id"], after["cluster_id"].astype(int), strict=True))


def test_between_fits_only_devices_without_a_current_segment_are_assigned(demo):
    resources = resources_for(demo.home)
    store = resources["persona_store"]
    before = table(store, "device_clusters", order_by=["device_id"]).set_index("device_id")
    registry_before = table(store, "segments", order_by=["cluster_id"])
    moved = before.index[::300].tolist()  # 10 devices, as if their vectors had just changed
    with store.begin() as connection:
        connection.execute(
            sa.text("DELETE FROM device_clusters WHERE device_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": moved},
        )
    with dg.instance_for_test() as instance:
        result = dg.materialize(FIT_AND_ASSIGN, resources=resources, instance=instance)
    assert result.asset_materializations_for_node("segments")[0].metadata["mode"].value == "kept"
    metadata = result.asset_materializations_for_node("device_clusters")[0].metadata
    assert metadata["devices_assigned"].value == 10 and metadata["devices"].value == 3000
    after = table(store, "device_clusters", order_by=["device_id"]).set_index("device_id")
    untouched = before.drop(index=moved)
    assert after.drop(index=moved)["clustered_at"].equals(untouched["clustered_at"])
    # K-means' segments are the nearest centre's: the moved devices land where they were.
    assert (after.loc[moved, "cluster_id"] == before.loc[moved, "cluster_id"]).sum() >= 9
    assert (after.loc[moved, "clustered_at"] > untouched["clustered_at"].max()).all()
    registry = table(store, "segments", order_by=["cluster_id"])
    assert registry["cluster_id"].tolist() == registry_before["cluster_id"].tolist()
    assert registry["devices"].sum() == 3000
    assert registry["traits"].tolist() == registry_before["traits"].tolist()
    # An assign run still shows the segments' profiles (the last fit's, with today's sizes).
    shown = metadata["segment_profiles"].value
    assert all(f"| {name} |" in shown for name in registry.loc[registry["active"], "name"])
    payloads = cluster_payloads(demo.home)
    assert payloads == dict(zip(after.index, after["cluster_id"].astype(int), strict=True))


def test_segment_profiles_and_top_anomalies_are_readable_in_the_ui_metadata(demo):
    resources = resources_for(demo.home)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*FIT_AND_ASSIGN, anomaly_scores], resources=resources, instance=instance, run_config=REFIT
        )
    clusters = result.asset_materializations_for_node("segments")[0].metadata
    segments = clusters["segments"].value
    assert 4 <= segments <= 12
    profile = clusters["segment_profiles"].value
    assert profile.count("\n") == segments + 1  # header, rule and one row per segment
    assert " use " in profile and "(fleet " in profile
    assert 0 < clusters["silhouette"].value < 1
    assert "segments; smallest" in clusters["size_distribution"].value

    scores = result.asset_materializations_for_node("anomaly_scores")[0].metadata
    top = scores["top_anomalies"].value
    assert top.count("\n") == 11 and "crashes" in top and "vs" in top
    assert 0.002 <= scores["anomaly_rate"].value <= 0.05
    checks = result.get_asset_check_evaluations()
    # A refit of the same vectors keeps its segments (adjusted Rand index 1).
    assert sorted((c.check_name, c.passed) for c in checks) == sorted(
        [(RATE_CHECK, True), (STABILITY_CHECK, True), (ASSIGNED_CHECK, True)]
    )

    store = resources["persona_store"]
    stored = table(store, "anomaly_scores")
    assert len(stored) == 3000 and stored["score"].between(0, 1).all()
    flagged = stored[stored["is_anomaly"].astype(bool)]
    assert flagged["reason"].notna().all() and (flagged["score"] >= 0.5).all()
    truth = pd.read_csv(demo.home / "ground_truth" / "devices.csv").set_index("device_id")
    failing_reasons = flagged[flagged["device_id"].map(truth["failing"])]["reason"]
    assert len(failing_reasons) >= 40
    assert failing_reasons.str.contains("crashes|battery drain|signal").all()


def test_a_narrow_rate_band_makes_the_check_warn_without_failing_the_run(demo):
    resources = resources_for(demo.home)
    config = {"ops": {"anomaly_scores": {"config": {"expected_rate_min": 0.2, "expected_rate_max": 0.3}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([anomaly_scores], resources=resources, instance=instance, run_config=config)
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "outside 20.00% .. 30.00%" in check.description


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory):
    yield from evaluated_fleet(tmp_path_factory.mktemp("small"), devices=400, days=3, seed=5)


def test_hdbscan_leaves_outliers_in_no_segment_and_scores_them_against_the_nearest(small_fleet):
    resources = resources_for(small_fleet.home)
    config = {"ops": {"segments": {"config": {"algorithm": "hdbscan", "hdbscan_min_cluster_size": 15}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*FIT_AND_ASSIGN, anomaly_scores], resources=resources, instance=instance, run_config=config
        )
    assert result.success
    assert result.asset_materializations_for_node("segments")[0].metadata["algorithm"].value == "hdbscan"
    metadata = result.asset_materializations_for_node("device_clusters")[0].metadata
    store = resources["persona_store"]
    clusters = table(store, "device_clusters").set_index("device_id")
    noise = clusters.index[clusters["cluster_id"] == -1]
    assert metadata["noise_devices"].value == len(noise) > 0
    scores = table(store, "anomaly_scores").set_index("device_id")
    assert (scores.loc[noise, "cluster_id"] >= 1).all()  # compared with a real segment


def test_invalid_clustering_config_is_refused_before_the_run(small_fleet):
    resources = resources_for(small_fleet.home)
    config = {"ops": {"segments": {"config": {"algorithm": "spectral"}}}}
    with dg.instance_for_test() as instance, pytest.raises(dg.DagsterInvalidConfigError, match="algorithm"):
        dg.materialize(FIT_AND_ASSIGN, resources=resources, instance=instance, run_config=config)


class UnreachablePayloads(VectorIndex):
    """The real embedded index, except that payload writes fail as if the server went away."""

    @contextmanager
    def open(self) -> Iterator[VectorStore]:
        with super().open() as index:

            def unreachable(*_args, **_kwargs) -> None:
                raise VectorIndexError(f"vector index at {self.location} failed: connection reset")

            index.set_payload = unreachable
            yield index


def test_payloads_catch_up_after_a_run_that_failed_half_way(small_fleet):
    resources = resources_for(small_fleet.home)
    store = resources["persona_store"]
    config = {"ops": {"segments": {"config": {"n_clusters": 3}}}}
    with dg.instance_for_test() as instance:
        failed = dg.materialize(
            FIT_AND_ASSIGN,
            resources={**resources, "vector_index": UnreachablePayloads(path=resources["vector_index"].path)},
            instance=instance,
            run_config=config,
            raise_on_error=False,
        )
        assert not failed.success
        clusters = table(store, "device_clusters")
        assert clusters["cluster_id"].nunique() == 3  # the table moved on, the payloads did not
        expected = dict(zip(clusters["device_id"], clusters["cluster_id"].astype(int), strict=True))
        assert cluster_payloads(small_fleet.home) != expected

        retried = dg.materialize(FIT_AND_ASSIGN, resources=resources, instance=instance, run_config=config)
    assert (
        retried.asset_materializations_for_node("device_clusters")[0].metadata["payloads_written"].value > 0
    )
    assert cluster_payloads(small_fleet.home) == expected


def test_segments_refuse_vectors_from_another_feature_schema(small_fleet, tmp_path):
    shipped = Path(__file__).parents[1] / "persona_pipeline" / "config" / "feature_schema.yaml"
    (tmp_path / "feature_schema.yaml").write_text(shipped.read_text().replace("Berlin, ", ""))
    resources = {**resources_for(small_fleet.home), "persona_config": PersonaConfig(config_dir=str(tmp_path))}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [anomaly_scores], resources=resources, instance=instance, raise_on_error=False
        )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    # Said at once, not hidden behind "Exceeded max_retries": no retry changes the stored vectors.
    assert "materialize persona_vectors first" in failure.step_failure_data.error.message


def test_demo_offers_reach_movers_heavy_users_and_anomalies_and_reruns_add_nothing(demo):
    store = resources_for(demo.home)["persona_store"]
    offers = table(store, "service_recommendations")
    truth = pd.read_csv(demo.home / "ground_truth" / "devices.csv")
    location = offers[offers["trigger"] == "location"].merge(truth[["device_id", "new_city"]], on="device_id")
    movers = truth[truth["moved"]]
    named = location[
        [city in reason for city, reason in zip(location["new_city"], location["reason"], strict=True)]
    ]
    # Every mover, for its new city, but those whose offers that day were drawn at random
    # (exploration, 5 % of device-days) and those whose week was full (2 offers).
    catalog = load_service_catalog()
    per_device = offers.groupby("device_id").size()
    full = set(per_device[per_device >= catalog.rules.max_offers_per_week].index)
    day = offers["offer_day"].max()
    exploring = set(movers["device_id"][explores(movers["device_id"], day, catalog.rules.exploration_share)])
    assert set(movers["device_id"]) - exploring - full <= set(named["device_id"])
    assert len(set(movers["device_id"]) & set(named["device_id"])) >= 0.9 * len(movers)
    usage = offers[offers["trigger"] == "usage"]
    heavy = truth[truth["heavy_user"]]
    pairs = set(zip(usage["device_id"], usage["service_id"].str.split(":").str[-1], strict=True))
    served = [(d, app) in pairs for d, app in zip(heavy["device_id"], heavy["heavy_app"], strict=True)]
    # The fleet's daily budget (0.3 offers per device) serves devices by their best expected value
    # and defers the rest: a few heavy users' tutorials wait past the fleet's last day.
    assert sum(served) >= 0.85 * len(heavy)
    scores = table(store, "anomaly_scores")
    faults = scores[(scores["is_anomaly"] == 1) & (scores["kind"].isna() | (scores["kind"] == "health"))]
    assert set(faults["device_id"]) <= set(offers.loc[offers["trigger"] == "support", "device_id"])
    assert set(offers.loc[offers["trigger"] == "support", "device_id"]) <= set(faults["device_id"])
    assert per_device.max() <= catalog.rules.max_offers_per_week
    tickets = table(store, "support_tickets")
    assert len(tickets) > 0 and not tickets[tickets["status"] == "open"].duplicated("device_id").any()
    assert set(tickets["device_id"]) <= set(faults["device_id"])

    from persona_pipeline.offers.assets import service_recommendations

    with dg.instance_for_test() as instance:
        again = dg.materialize(
            [service_recommendations], resources=resources_for(demo.home), instance=instance
        )
    metadata = again.asset_materializations_for_node("service_recommendations")[0].metadata
    assert metadata["offers_new"].value == 0 and metadata["tickets_opened"].value == 0
    assert len(table(store, "service_recommendations")) == len(offers)
    assert len(table(store, "support_tickets")) == len(tickets)


def test_the_segment_payload_has_one_writer_and_a_rewritten_point_gets_its_segment_back(small_fleet):
    """persona_index replaces a point whole and writes no cluster_id; device_clusters finds the
    points rewritten since it last wrote their payload and writes exactly those."""
    resources = resources_for(small_fleet.home)
    store = resources["persona_store"]
    with dg.instance_for_test() as instance:
        dg.materialize(FIT_AND_ASSIGN, resources=resources, instance=instance)
        clusters = table(store, "device_clusters")
        expected = dict(zip(clusters["device_id"], clusters["cluster_id"].astype(int), strict=True))
        assert cluster_payloads(small_fleet.home) == expected
        rewritten = sorted(expected)[::40]  # 10 devices whose points the index must write again
        with store.begin() as connection:
            connection.execute(
                sa.text("DELETE FROM vector_index_state WHERE device_id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": rewritten},
            )
        indexed = dg.materialize([persona_index], resources=resources, instance=instance)
        assert (
            indexed.asset_materializations_for_node("persona_index")[0].metadata["points_written"].value == 10
        )
        payloads = cluster_payloads(small_fleet.home)
        assert [payloads[device] for device in rewritten] == [None] * 10
        assert {d: k for d, k in payloads.items() if d not in rewritten} == {
            d: k for d, k in expected.items() if d not in rewritten
        }

        synced = dg.materialize([device_clusters], resources=resources, instance=instance)
    assert (
        synced.asset_materializations_for_node("device_clusters")[0].metadata["payloads_written"].value == 10
    )
    assert cluster_payloads(small_fleet.home) == expected


def test_the_vector_count_check_warns_when_a_stored_vector_went_missing(small_fleet):
    from persona_pipeline.personas.assets import VECTOR_COUNT_CHECK, persona_vectors

    resources = resources_for(small_fleet.home)
    store = resources["persona_store"]
    lost = table(store, "persona_vectors", order_by=["device_id"]).iloc[[0]]
    with dg.instance_for_test() as instance:
        before = dg.materialize([persona_vectors], resources=resources, instance=instance)
        with store.begin() as connection:
            connection.execute(
                sa.text("DELETE FROM persona_vectors WHERE device_id = :d"), {"d": lost["device_id"].iloc[0]}
            )
        after = dg.materialize([persona_vectors], resources=resources, instance=instance)
    with store.begin() as connection:  # put it back for the other tests of this fleet
        store.insert_frame(connection, store_metadata.tables["persona_vectors"], lost)
    [kept] = before.get_asset_check_evaluations()
    [missing] = after.get_asset_check_evaluations()
    assert kept.check_name == missing.check_name == VECTOR_COUNT_CHECK
    assert kept.passed and not missing.passed
    assert missing.metadata["vectors_stored"].value == missing.metadata["devices_counted"].value - 1


def test_the_assignment_check_warns_for_a_device_left_without_a_current_segment():
    assert assigned_check(0).passed
    check = assigned_check(1_200)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.description == "1,200 devices lack a segment of the current fit"


def test_a_shards_run_writes_the_segment_payloads_of_its_own_devices_only(small_fleet):
    """Shards' runs side by side must not write (and record) each other's points' payloads."""
    resources = resources_for(small_fleet.home)
    store, index = resources["persona_store"], resources["vector_index"]
    with dg.instance_for_test() as instance:
        assert dg.materialize(FIT_AND_ASSIGN, resources=resources, instance=instance).success
    with store.begin() as connection:
        connection.execute(sa.text("DELETE FROM vector_index_clusters"))  # every payload stale
    shard = DeviceShard(0, 3)
    written = sync_cluster_payloads(store, index, shard)
    recorded = table(store, "vector_index_clusters")
    devices = table(store, "device_clusters")["device_id"]
    assert 0 < written == len(recorded) == int(shard.holds(devices).sum()) < len(devices)
    assert shard.holds(recorded["device_id"]).all()
    assert sync_cluster_payloads(store, index) == len(devices) - written  # the other shards' after
