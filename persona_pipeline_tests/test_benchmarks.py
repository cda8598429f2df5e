"""The benchmark harness on a tiny fleet, so it cannot rot. Nothing here asserts a timing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from benchmarks import fleet
from benchmarks.measure import Measured, human_bytes, run_measured
from benchmarks.report import size_table, targets_table
from benchmarks.run import (
    CHAIN,
    Options,
    Results,
    benchmark,
    fresh_home,
    generate,
    run_stage,
    store_earlier_offers,
)
from persona_pipeline.feature_schema import load_feature_schema
from persona_pipeline.ingest.validation import validate_updates
from persona_pipeline.resources import PersonaStore
from persona_pipeline.resources.landing_files import read_landing_file
from persona_pipeline.store.tables import service_recommendations

pytestmark = pytest.mark.store_agnostic
DAY = "2026-03-02"


def test_generated_updates_follow_the_landing_contract(tmp_path: Path):
    devices = fleet.make_devices(300, seed=3)
    updates = fleet.day_updates(devices, DAY, 10, seed=3, bad_share=0.01)
    [path] = fleet.write_day(updates, tmp_path, DAY)
    assert path.parent == tmp_path / "index_updates" / f"date={DAY}"

    read = read_landing_file(path, "part")
    start = pd.Timestamp(DAY, tz="UTC")
    result = validate_updates(read.rows, load_feature_schema(), DAY, start, start + pd.Timedelta(days=1))
    assert len(read.rows) == 3_000 and read.rejects.empty
    assert result.unknown_key_rows == 0
    assert 0 < len(result.rejects) < 100  # the planted bad rows, nothing else
    assert result.accepted["device_id"].nunique() == 300
    assert result.accepted["observed_at"].between(start, start + pd.Timedelta(hours=25)).all()


def test_harness_runs_every_stage_the_baseline_and_prints_the_table(tmp_path: Path):
    options = Options(
        devices=200, work=tmp_path, day=DAY, index_sample=50, dagster=False, upsert_sample=20, isolate=False
    )
    results = benchmark(options, say=lambda _: None)

    assert results.full["read_validate"][0].result["rows_in"] == 2_000
    assert results.incremental["read_validate"][0].result["rows_in"] == 20  # 1% of the devices changed
    assert results.full["index"][0].result["rows_in"] == 50  # the sample, time extrapolated
    assert results.full["index"][0].result["extrapolated_seconds"] > 0
    assert results.full["weights"][0].result["rows_in"] > 0  # offers were made and answered
    assert results.naive[0].result["devices"] == 200
    assert results.in_memory[0].result["rows_in"] == results.full["profiles"][0].result["rows_in"]
    table = size_table(results)
    for label in ("read+validate", "profiles merge", "index write*", "weights refresh", "naive baseline"):
        assert label in table
    assert "speed-up, ingest -> vectors in memory" in table
    assert "speed-up, ingest -> vectors through the store" in table
    targets = targets_table([results]).splitlines()
    assert "no chain run at 1,000,000 devices or more" in targets[1]
    assert targets[2].split()[-1].endswith("%") or "over:" in targets[2]  # the incremental day, measured
    assert "200 devices:" in targets[3] and ("met" in targets[3] or "MISSED" in targets[3])
    assert "not measured" in targets[4]  # one size
    assert "not measured" in targets[5]  # no 10M run


def test_a_stage_in_its_own_process_reports_its_time_and_peak_memory(tmp_path: Path):
    options = Options(devices=100, work=tmp_path, day=DAY)
    generate(options)
    measured = run_stage(options, fresh_home(options, "run"), "read_validate", DAY)
    assert measured.result["rows_in"] == 1_000
    assert measured.peak_rss > 50 * 2**20
    assert measured.seconds > 0


def test_a_child_is_measured_without_the_memory_of_the_process_that_started_it(tmp_path: Path):
    """Linux gives a process the peak RSS of the one it was forked from at exec: a stage started
    by a driver holding the fleet (gigabytes at 1M devices) would report the driver's memory."""
    held = np.ones(600 * 2**20 // 8)  # 600 MiB in this process, touched
    quiet = run_measured([sys.executable, "-c", "import sys"], tmp_path / "child.log")
    assert held.sum() > 0
    assert quiet.peak_rss < 200 * 2**20, human_bytes(quiet.peak_rss)
    busy = run_measured(
        [sys.executable, "-c", "import numpy as np; a = np.ones(300 * 2**20 // 8); a.sum()"],
        tmp_path / "child.log",
    )
    assert 300 * 2**20 < busy.peak_rss < 500 * 2**20, human_bytes(busy.peak_rss)


def test_earlier_offers_are_stored_for_the_days_before_the_first(tmp_path: Path):
    """`--offer-history-days`: the budget's worth of offers on each of the days before day 1."""
    store = PersonaStore(url=f"sqlite:///{tmp_path / 'persona.db'}")
    first_day = pd.DataFrame(
        {
            "offer_id": ["offer-1", "offer-2"],
            "device_id": ["dev-0000001", "dev-0000002"],
            "service_id": ["app_tutorial:maps", "regional_services"],
            "trigger": ["usage", "location"],
            "score": 0.4,
            "reason": "made on day 1",
            "created_at": pd.Timestamp(DAY, tz="UTC"),
            "offer_day": DAY,
            "priority": 0.5,
            "cluster_id": [1, 2],
        }
    )
    with store.begin() as connection:
        store.insert_frame(connection, service_recommendations, first_day)

    stored = store_earlier_offers(tmp_path, Options(devices=200, day=DAY, offer_history_days=3))

    offers = store.read_frame(sa.select(service_recommendations))
    earlier = offers[offers["offer_day"] < DAY]
    assert stored == len(earlier) == 3 * 60
    assert sorted(earlier["offer_day"].unique()) == ["2026-02-27", "2026-02-28", "2026-03-01"]
    assert not offers["offer_id"].duplicated().any()
    made_on = pd.to_datetime(earlier["created_at"], utc=True).dt.strftime("%Y-%m-%d")
    assert (made_on == earlier["offer_day"]).all()
    assert not earlier.duplicated(["device_id", "offer_day"]).any()
    assert set(earlier["device_id"]) <= set(fleet.make_devices(200, 7).ids.to_pylist())
    assert set(zip(earlier["service_id"], earlier["trigger"], strict=True)) <= set(
        zip(first_day["service_id"], first_day["trigger"], strict=True)
    )


def _runs(seconds: float, peak_gib: float = 1.0) -> list[Measured]:
    return [Measured(seconds=seconds, peak_rss=int(peak_gib * 1024**3), result={})]


def _sized(devices: int, full: dict, incremental: dict) -> Results:
    return Results(Options(devices=devices), generated={}, full=full, incremental=incremental)


def test_the_targets_table_says_which_targets_hold_and_names_what_misses():
    small = _sized(100_000, {"read_validate": _runs(6.5), CHAIN: _runs(60.0)}, {})
    large = _sized(
        1_000_000,
        {"read_validate": _runs(80.0), CHAIN: _runs(290.0, peak_gib=3.9)},
        {"read_validate": _runs(1.0), CHAIN: _runs(60.0)},
    )
    chain, incremental, speed_up, growth, largest = targets_table([small, large]).splitlines()[1:]
    assert "  met  " in chain and "1,000,000 devices: 290.0 s, peak 3.90 GiB" in chain
    assert "MISSED" in incremental and "whole chain (Dagster) 20.7%" in incremental
    assert "read+validate" not in incremental  # 1.2 % of its full day
    assert "not measured" in speed_up
    assert "MISSED" in growth and "read+validate 1.23" in growth and "whole chain" not in growth
    assert "not measured" in largest
    sharded = Results(
        Options(devices=10_000_000, device_shards=16), generated={}, full={CHAIN: _runs(3300.0, 2.5)}
    )
    assert "  met  " in targets_table([large, sharded]).splitlines()[-1]  # 1.14x the 1M chain per device
    sharded.full[CHAIN] = _runs(3300.0, peak_gib=3.2)
    assert "MISSED" in targets_table([large, sharded]).splitlines()[-1]

    quicker = _sized(
        1_000_000,
        {"read_validate": _runs(60.0), CHAIN: _runs(170.0, peak_gib=4.2)},
        {"read_validate": _runs(1.0), CHAIN: _runs(20.0)},
    )
    chain, incremental, _, growth, _ = targets_table([small, quicker]).splitlines()[1:]
    assert "MISSED" in chain and "(stretch met)" in chain  # fast enough, but over the memory target
    assert "  met  " in incremental and "largest 11.8%" in incremental
    assert "  met  " in growth and "largest 0.92" in growth
