"""What runs without a click: the daily schedule, the landing-folder sensor, the weights sensor
and the automation conditions that carry an update down the chain."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from persona_pipeline.definitions import defs
from persona_pipeline.feedback.sensors import key_weights_sensor
from persona_pipeline.ingest import sensors as ingest_sensors
from persona_pipeline.ingest.jobs import ingest_schedule
from persona_pipeline.ingest.sensors import index_updates_sensor
from persona_pipeline.resources import LandingZone
from persona_pipeline_tests.conftest import update, write_jsonl

DOWNSTREAM = [
    "persona_vectors",
    "persona_index",
    "segments",
    "device_clusters",
    "anomaly_scores",
    "service_recommendations",
]


def settled(path: Path, seconds_ago: float = 60) -> Path:
    """Give a landing file a modification time in the past, as if it had finished landing."""
    past = time.time() - seconds_ago
    os.utime(path, (past, past))
    return path


def tick(sensor, instance, landing: Path, cursor: str | None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"landing_zone": LandingZone(path=str(landing))}
    )
    return sensor(context)


def test_landing_sensor_requests_a_day_when_its_files_change_and_only_then(landing, instance):
    settled(
        write_jsonl(landing, "2026-03-02", [update("d1", "device.model", "X", "2026-03-02T08:00:00+00:00")])
    )
    first = tick(index_updates_sensor, instance, landing, None)
    assert [r.partition_key for r in first.run_requests] == ["2026-03-02"]

    assert not tick(index_updates_sensor, instance, landing, first.cursor).run_requests

    # A late file for a past day, and a file still being written for another: only the first.
    late = write_jsonl(
        landing, "2026-03-01", [update("d2", "device.model", "Y", "2026-03-01T23:59:00+00:00")]
    )
    settled(late)
    write_jsonl(landing, "2026-03-03", [update("d3", "device.model", "Z", "2026-03-03T01:00:00+00:00")])
    second = tick(index_updates_sensor, instance, landing, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["2026-03-01"]

    settled(landing / "index_updates" / "date=2026-03-03" / "part-0.jsonl")
    third = tick(index_updates_sensor, instance, landing, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["2026-03-03"]

    # A second file in a day already read: that day again, with a new run key.
    settled(
        write_jsonl(
            landing, "2026-03-02", [update("d4", "device.model", "X", "2026-03-02T09:00:00+00:00")], "b.jsonl"
        )
    )
    fourth = tick(index_updates_sensor, instance, landing, third.cursor)
    assert [r.partition_key for r in fourth.run_requests] == ["2026-03-02"]
    assert fourth.run_requests[0].run_key != first.run_requests[0].run_key
    assert set(json.loads(fourth.cursor)) == {"2026-03-01", "2026-03-02", "2026-03-03"}


def test_landing_sensor_skips_days_outside_the_partitions_until_they_are_inside(
    landing, instance, monkeypatch
):
    settled(
        write_jsonl(landing, "2019-05-01", [update("d1", "device.model", "X", "2019-05-01T08:00:00+00:00")])
    )
    result = tick(index_updates_sensor, instance, landing, None)
    assert not result.run_requests
    assert "2019-05-01" in json.loads(result.cursor)  # warned once, not every tick
    assert not tick(index_updates_sensor, instance, landing, result.cursor).run_requests

    # After a restart whose partitions reach back to that day (PERSONA_PARTITION_START, or an
    # earlier first landed day), the day is read: skipped is not read.
    earlier = dg.DailyPartitionsDefinition(start_date="2019-01-01", end_offset=1)
    monkeypatch.setattr(ingest_sensors, "daily_partitions", earlier)
    later = tick(index_updates_sensor, instance, landing, result.cursor)
    assert [r.partition_key for r in later.run_requests] == ["2019-05-01"]


def test_schedule_runs_the_day_that_just_ended():
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 3, 5, 0, 30, tzinfo=UTC))
    [request] = ingest_schedule(context)
    assert request.partition_key == "2026-03-04"
    assert ingest_schedule.cron_schedule == "30 0 * * *"


def test_weights_sensor_rebuilds_vectors_once_per_new_weights_version(instance):
    def materialize_weights(changed: bool) -> None:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("key_weights", metadata={"live_version_changed": changed})
        )

    context = dg.build_sensor_context(instance=instance)
    assert not key_weights_sensor(context).run_requests
    materialize_weights(True)
    first = key_weights_sensor(dg.build_sensor_context(instance=instance))
    assert len(first.run_requests) == 1
    assert not key_weights_sensor(
        dg.build_sensor_context(instance=instance, cursor=first.cursor)
    ).run_requests
    materialize_weights(False)
    quiet = key_weights_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
    assert not quiet.run_requests and quiet.cursor != first.cursor


def test_new_profiles_request_the_whole_chain_in_one_tick_and_feedback_refreshes_the_weights(instance):
    def materialized(*keys: str, partition: str | None = None) -> None:
        for key in keys:
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))

    def evaluate(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        keys = defs.resolve_asset_graph().get_all_asset_keys()
        return result, {key.to_user_string() for key in keys if result.get_num_requested(key)}

    result, wanted = evaluate(None)
    assert wanted == set()  # nothing upstream happened: nothing to do, missing partitions or not
    materialized("index_updates", "device_profiles", partition="2026-03-02")
    result, wanted = evaluate(result.cursor)
    assert wanted == set()  # the vectors wait for key_weights (configured_weights_sensor asks for it)
    materialized("key_weights")
    result, wanted = evaluate(result.cursor)
    assert wanted == set(DOWNSTREAM)  # one run, in dependency order; the weights are not part of it
    result, wanted = evaluate(result.cursor)
    assert wanted == set()  # requested once, not every tick

    materialized("anomaly_scores")  # someone re-ran the scores by hand: the offers follow
    result, wanted = evaluate(result.cursor)
    assert wanted == {"service_recommendations"}
    materialized("service_recommendations")
    result, wanted = evaluate(result.cursor)
    assert wanted == set()  # new offers alone do not refresh the weights

    instance.add_dynamic_partitions("offer_feedback_batches", ["batch-1"])
    materialized("offer_feedback", partition="batch-1")
    result, wanted = evaluate(result.cursor)
    assert wanted == {"key_weights"}


def test_schedules_and_sensors_run_by_default():
    repository = defs.get_repository_def()
    assert repository.get_schedule_def("ingest_schedule").default_status == dg.DefaultScheduleStatus.RUNNING
    for sensor in repository.sensor_defs:
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, sensor.name


def test_automation_can_start_stopped_for_a_deployment_that_only_backfills():
    import subprocess
    import sys

    probe = (
        "from persona_pipeline.definitions import defs; r = defs.get_repository_def(); "
        "print(sorted({s.default_status.value for s in [*r.sensor_defs, *r.schedule_defs]}))"
    )
    env = {**os.environ, "PERSONA_AUTOMATION": "off"}
    stopped = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", probe], env=env, capture_output=True, text=True
    )
    assert stopped.stdout.strip() == "['STOPPED']", stopped.stderr
    env["PERSONA_AUTOMATION"] = "sometimes"
    refused = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", probe], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "PERSONA_AUTOMATION='sometimes': expected on or off" in refused.stderr


def test_landing_sensor_skips_days_already_ingested_by_the_command_line(landing, instance, monkeypatch):
    """A daemon started after `persona-pipeline run` (no cursor yet) does not ingest again the days
    that run read, only a day whose files changed after it."""
    for day in ("2026-03-01", "2026-03-02"):
        settled(write_jsonl(landing, day, [update("d1", "device.model", "X", f"{day}T08:00:00+00:00")]))
    ingest = defs.resolve_job_def("ingest_job")
    for day in ("2026-03-01", "2026-03-02"):
        assert ingest.execute_in_process(instance=instance, partition_key=day).success

    first = tick(index_updates_sensor, instance, landing, None)
    assert not first.run_requests
    assert set(json.loads(first.cursor)) == {"2026-03-01", "2026-03-02"}

    # A file that lands after those runs: settled at once here, so its time is after theirs.
    monkeypatch.setattr(ingest_sensors, "SETTLE_SECONDS", 0)
    write_jsonl(
        landing, "2026-03-02", [update("d2", "device.model", "Y", "2026-03-02T09:00:00+00:00")], "b.jsonl"
    )
    later = tick(index_updates_sensor, instance, landing, None)
    assert [r.partition_key for r in later.run_requests] == ["2026-03-02"]


def test_weights_sensor_reads_a_key_weights_materialization_from_before_the_gate(instance):
    """A store upgraded while a new weights version waited for its vectors: the last key_weights
    materialization says `new_version` (text), not `live_version_changed`; it still rebuilds."""
    instance.report_runless_asset_event(dg.AssetMaterialization("key_weights", metadata={"new_version": "3"}))
    assert len(key_weights_sensor(dg.build_sensor_context(instance=instance)).run_requests) == 1
    instance.report_runless_asset_event(
        dg.AssetMaterialization("key_weights", metadata={"new_version": "none: nothing changed"})
    )
    tick = key_weights_sensor(dg.build_sensor_context(instance=instance))
    assert not tick.run_requests
