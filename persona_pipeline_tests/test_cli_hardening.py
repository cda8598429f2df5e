"""The command line when things go wrong: folders outside the partitions, dead runs holding
pool slots, failed steps, paths from arguments."""

from __future__ import annotations

import pytest

from persona_pipeline.cli import CommandError
from persona_pipeline.partitions import daily_partitions
from persona_pipeline.resources import LandingZone
from persona_pipeline.runner import resolve_days
from persona_pipeline_tests.conftest import update, write_jsonl

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
