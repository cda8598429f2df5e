"""The command line when things go wrong: folders outside the partitions, dead runs holding
pool slots, failed steps, paths from arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from persona_pipeline.app.home import CommandError
from persona_pipeline.app.runner import resolve_days
from persona_pipeline.partitions import daily_partitions
from persona_pipeline.resources import LandingZone
from persona_pipeline_tests.conftest import update, write_jsonl
from persona_pipeline_tests.test_cli_and_definitions import run_cli

FIRST = daily_partitions.get_first_partition_key()


def _landed(landing, *days: str) -> LandingZone:
    for day in days:
        write_jsonl(landing, day, [update("d-1", "device.location.city", "Berlin", f"{day}T08:00:00+00:00")])
    return LandingZone(path=str(landing))


@pytest.mark.store_agnostic
def test_default_run_skips_folders_outside_the_partitions_and_names_them(landing):
    zone = _landed(landing, "2099-01-01", "2025-06-01", "2026-03-01", "2026-03-02")
    days = resolve_days(zone, None, None)
    assert (days.start, days.end) == ("2026-03-01", "2026-03-02")
    skipped = "\n".join(days.skipped)
    assert "date=2099-01-01" in skipped and "has not begun" in skipped
    assert "date=2025-06-01" in skipped and "PERSONA_PARTITION_START=2025-06-01" in skipped
    assert "PERSONA_PARTITION_START" not in next(line for line in days.skipped if "2099" in line)


@pytest.mark.store_agnostic
def test_only_folders_outside_the_partitions_is_one_clear_error(landing):
    zone = _landed(landing, "2099-01-01")
    with pytest.raises(CommandError, match=r"date=2099-01-01 .*has not begun"):
        resolve_days(zone, None, None)


@pytest.mark.store_agnostic
def test_explicit_future_end_says_the_day_has_not_begun(landing):
    zone = _landed(landing, "2026-03-01")
    with pytest.raises(CommandError) as raised:
        resolve_days(zone, "2026-03-01", "2099-01-01")
    assert "2099-01-01" in str(raised.value) and "PERSONA_PARTITION_START" not in str(raised.value)
    with pytest.raises(CommandError, match="PERSONA_PARTITION_START"):
        resolve_days(zone, "2020-01-01", "2026-03-01")


def test_a_failed_step_is_one_line_naming_a_log_with_the_whole_error(tmp_path):
    home = tmp_path / "home"
    generated = run_cli(
        "generate", "--devices", "40", "--days", "1", "--start", "2026-03-01", cwd=tmp_path, home=home
    )
    assert generated.returncode == 0, generated.stderr
    env_url = "sqlite:////proc/no-such-folder/persona.db"  # a store that cannot be created
    failed = run_cli("run", cwd=tmp_path, home=home, extra_env={"PERSONA_DB_URL": env_url})
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr[-3000:]
    assert lines[0].startswith("persona-pipeline: ingest_job failed in index_updates: ")
    log = Path(re.search(r"details in (\S+\.log)\)", lines[0]).group(1))
    assert log.parent == home / "logs" and "Stack Trace" in log.read_text()


def test_an_error_check_that_fails_makes_the_run_exit_non_zero(tmp_path):
    home = tmp_path / "home"
    day = "2026-03-01"
    good = [update(f"d-{i}", "device.location.city", "Berlin", f"{day}T08:00:00+00:00") for i in range(20)]
    bad = [{"device_id": "", "key": "device.location.city", "value": "Berlin", "observed_at": "x"}] * 20
    write_jsonl(home / "landing", day, good + bad)
    ran = run_cli("run", cwd=tmp_path, home=home)
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert "devices profiled" in ran.stdout  # the summary is still printed
    assert re.search(r"check \w*reject\w* on index_updates failed", ran.stderr), ran.stderr


def test_a_day_with_no_valid_row_still_gets_its_summary(tmp_path):
    """Nothing is profiled, so nothing is segmented: the summary says so instead of failing."""
    home = tmp_path / "home"
    bad = [{"device_id": "", "key": "device.location.city", "value": "Berlin", "observed_at": "x"}] * 20
    write_jsonl(home / "landing", "2026-03-01", bad)
    ran = run_cli("run", cwd=tmp_path, home=home)
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert re.search(r"updates rejected\s+20\b", ran.stdout), ran.stdout + ran.stderr[-2000:]
    assert re.search(r"segments\s+0\b", ran.stdout), ran.stdout
    assert re.search(r"check \w*reject\w* on index_updates failed", ran.stderr), ran.stderr


def test_simulate_feedback_refuses_a_batch_id_that_leaves_the_landing_zone(tmp_path):
    home = tmp_path / "home"
    refused = run_cli("simulate-feedback", "--batch", "../../escaped", cwd=tmp_path, home=home)
    assert refused.returncode == 2
    assert "batch id '../../escaped'" in refused.stderr
    assert not list(tmp_path.rglob("*escaped*"))
