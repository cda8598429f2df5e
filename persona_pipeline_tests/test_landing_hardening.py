"""The landing zone's edges: folders and files that must be reported, never followed or read
blindly, and never stop the rest of the landing zone."""

from pathlib import Path

import pytest

from persona_pipeline.resources import LandingZone
from persona_pipeline.resources.landing_zone import check_batch_id, is_valid_batch_id

pytestmark = pytest.mark.store_agnostic


def feedback_batch(landing: Path, folder: str, complete: bool = True) -> Path:
    path = landing / "offer_feedback" / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "part-0.csv").write_text("offer_id,response,responded_at\n", encoding="utf-8")
    if complete:
        (path / "_SUCCESS").touch()
    return path


@pytest.mark.parametrize("batch_id", ["b1", "sim-2026-03-02-1", "A.b_c-9", "x" * 100])
def test_batch_ids_that_are_safe_partition_keys_pass(batch_id):
    assert is_valid_batch_id(batch_id)
    assert check_batch_id(batch_id) == batch_id


@pytest.mark.parametrize(
    "batch_id",
    ["", "..", "../../x", "a/b", "a..b", ".hidden", "-dash", "b 1", "b\n1", "x" * 101, "bätch"],
)
def test_batch_ids_unsafe_in_paths_or_as_partition_keys_are_refused_in_one_line(batch_id):
    assert not is_valid_batch_id(batch_id)
    with pytest.raises(ValueError) as error:
        check_batch_id(batch_id)
    message = str(error.value)
    assert "\n" not in message and message.startswith("batch id ")


def test_bad_feedback_batch_folders_are_skipped_and_named_while_good_ones_go_on(landing, tmp_path):
    feedback_batch(landing, "batch=b1")
    feedback_batch(landing, "batch=")
    feedback_batch(landing, "batch=bad id")
    feedback_batch(landing, "batch=b2", complete=False)  # still being written: not a problem
    feedback_batch(landing, "batches-2026")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "_SUCCESS").touch()
    (landing / "offer_feedback" / "batch=escaped").symlink_to(outside, target_is_directory=True)
    (landing / "offer_feedback" / "batch=file").write_text("not a folder", encoding="utf-8")

    zone = LandingZone(path=str(landing))

    assert zone.complete_feedback_batches() == ["b1"]
    problems = zone.feedback_folder_problems()
    assert len(problems) == 5, problems
    by_folder = {line.split(":")[0]: line for line in problems}
    assert "batch id '' is empty" in by_folder["offer_feedback/batch="]
    assert "batch id 'bad id'" in by_folder["offer_feedback/batch=bad id"]
    assert "not named batch=<id>" in by_folder["offer_feedback/batches-2026"]
    assert "outside the landing zone" in by_folder["offer_feedback/batch=escaped"]
    assert str(outside) not in by_folder["offer_feedback/batch=escaped"]
    assert "not a folder" in by_folder["offer_feedback/batch=file"]


def test_reading_an_unsafe_batch_id_is_refused(landing):
    zone = LandingZone(path=str(landing))
    with pytest.raises(ValueError, match=r"batch id '\.\./x'"):
        zone.read_feedback_batch("../x")
