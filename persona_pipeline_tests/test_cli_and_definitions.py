"""The console script end to end, and the code location as the UI loads it."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from persona_pipeline.definitions import defs
from persona_pipeline.demo.generator import generate_fleet
from persona_pipeline.partitions import FALLBACK_START, first_landed_day, partition_start
from persona_pipeline.resources import VectorIndex
from persona_pipeline_tests.conftest import store_url

REPO = Path(__file__).parents[1]
SCRIPT = Path(sys.executable).parent / "persona-pipeline"


def run_cli(
    *args: str, cwd: Path, home: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "QDRANT_", "DAGSTER_"))}
    env["PERSONA_HOME"] = str(home)
    env["PERSONA_DB_URL"] = store_url(home)
    env.update(extra_env or {})
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_generate_then_run_with_only_persona_home_set(tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    generated = run_cli(
        "generate",
        "--devices",
        "300",
        "--days",
        "3",
        "--seed",
        "3",
        "--start",
        "2026-03-01",
        cwd=elsewhere,
        home=home,
    )
    assert generated.returncode == 0, generated.stderr
    assert (home / "landing" / "index_updates" / "date=2026-03-03").is_dir()
    assert (home / "ground_truth" / "devices.csv").is_file()

    ran = run_cli("run", "--start", "2026-03-01", "--end", "2026-03-03", cwd=elsewhere, home=home)
    assert ran.returncode == 0, ran.stderr
    assert "devices profiled" in ran.stdout and "make dev" in ran.stdout

    import sqlalchemy as sa

    engine = sa.create_engine(store_url(home))
    with engine.connect() as connection:
        devices = connection.execute(
            sa.text("select count(distinct device_id) from device_profiles")
        ).scalar()
        rejects = connection.execute(sa.text("select count(*) from index_update_rejects")).scalar()
    truth = pd.read_csv(home / "ground_truth" / "malformed_rows.csv")
    assert devices == 300
    assert rejects == len(truth)  # every planted malformed row, and nothing else

    with VectorIndex(path=str(home / "qdrant")).open() as index:
        assert index.count(index.aliases()["personas"]) == devices

    # The runs are in the Dagster instance the UI opens (DAGSTER_HOME under PERSONA_HOME).
    assert (home / "dagster" / "dagster.yaml").is_file()
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        jobs = {run.job_name for run in instance.get_runs()}
        # The job pages list a job's runs by the label of the code location workspace.yaml names.
        location = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
        label = {".dagster/repository": f"__repository__@{location['location_name']}"}
        listed = instance.get_runs(dg.RunsFilter(job_name="segments_job", tags=label))
    assert jobs == {"ingest_job", "personas_job", "segments_job"}  # no feedback yet: no feedback runs
    assert len(listed) == 1


def test_run_fails_with_one_line_reason(tmp_path):
    result = run_cli("run", cwd=tmp_path, home=tmp_path / "empty")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no landed days" in lines[0]

    result = run_cli(
        "run", "--start", "2020-01-01", "--end", "2020-01-02", cwd=tmp_path, home=tmp_path / "empty"
    )
    assert result.returncode != 0 and "before the first partition" in result.stderr


def test_invalid_configuration_fails_the_run_naming_the_file(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "feature_schema.yaml").write_text("features:\n  - {key: device.a.b, type: colour, weight: 1}\n")
    env = {"PERSONA_CONFIG_DIR": str(config)}
    result = subprocess.run(
        [str(SCRIPT), "run", "--start", "2026-03-01", "--end", "2026-03-01"],
        cwd=tmp_path,
        env={**os.environ, "PERSONA_HOME": str(tmp_path / "h"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "feature_schema.yaml" in result.stderr and "features[0] ('device.a.b')" in result.stderr


def test_generator_is_deterministic_by_seed():
    first = generate_fleet(50, 2, seed=11, start="2026-03-01")
    second = generate_fleet(50, 2, seed=11, start="2026-03-01")
    other = generate_fleet(50, 2, seed=12, start="2026-03-01")
    pd.testing.assert_frame_equal(first.devices, second.devices)
    for day in first.updates:
        pd.testing.assert_frame_equal(first.updates[day], second.updates[day])
    assert not first.updates["2026-03-01"].equals(other.updates["2026-03-01"])


def test_code_location_lists_the_assets_jobs_and_groups():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {
        "index_updates",
        "device_profiles",
        "persona_vectors",
        "persona_index",
        "segments",
        "device_clusters",
        "anomaly_scores",
        "service_recommendations",
        "offer_feedback",
        "key_weights",
    }
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert groups["index_updates"] == "ingest" and groups["persona_index"] == "personas"
    assert groups["segments"] == groups["device_clusters"] == groups["anomaly_scores"] == "segments"
    assert groups["service_recommendations"] == "offers" and groups["offer_feedback"] == "feedback"
    assert defs.resolve_sensor_def("offer_feedback_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    upstream = {key.to_user_string() for key in graph.get(dg.AssetKey("device_clusters")).parent_keys}
    assert upstream == {"segments", "persona_vectors", "persona_index"}
    assert {key.to_user_string() for key in graph.get(dg.AssetKey("segments")).parent_keys} == {
        "persona_vectors"
    }
    assert defs.resolve_assets_def("device_clusters").op.pool == "vector_index"
    assert defs.resolve_assets_def("segments").op.pool is None  # the fit does not hold the index
    assert {job.name for job in defs.resolve_all_job_defs()} >= {
        "ingest_job",
        "personas_job",
        "segments_job",
        "feedback_job",
        "weights_job",
    }
    assert defs.resolve_assets_def("persona_index").op.pool == "vector_index"


def test_shipped_instance_config_is_the_repository_one():
    shipped = REPO / "persona_pipeline" / "deploy" / "dagster.yaml"
    assert shipped.read_text() == (REPO / "dagster.yaml").read_text()


@pytest.mark.skipif(not (REPO / "workspace.yaml").exists(), reason="needs the repository checkout")
def test_dagster_validates_the_workspace(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(not (REPO / "workspace.yaml").exists(), reason="needs the repository checkout")
def test_dagster_refuses_the_code_location_while_a_configuration_file_is_not_yaml(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    catalog = config / "service_catalog.yaml"
    catalog.write_text("rules:\n  daily_cap: [3\nservices: []\n")
    (tmp_path / "dagster.yaml").write_text("")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path), "PERSONA_CONFIG_DIR": str(config)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"ConfigError: {catalog}: invalid YAML at line 3, column 9" in output
    assert "(while parsing a flow sequence that starts at line 2)" in output


def test_loading_the_definitions_prints_no_warning():
    """Every process that loads the code location (webserver, daemon, each run) would repeat it."""
    loaded = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import persona_pipeline.definitions"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Warning" not in loaded.stderr, loaded.stderr


def test_partitions_start_a_week_before_the_first_landed_day(tmp_path):
    landing = tmp_path / "landing"
    assert partition_start(None, landing) == FALLBACK_START  # nothing landed yet
    for name in ("date=2026-11-20", "date=2026-11-22", "date=2026-02-30", "date=2026-1-5", "date=soon"):
        (landing / "index_updates" / name).mkdir(parents=True)
    (landing / "index_updates" / "date=2026-10-01").write_text("a file, not a day folder")
    assert first_landed_day(landing) == "2026-11-20"
    assert partition_start(None, landing) == "2026-11-13"
    assert partition_start(" 2025-06-01 ", landing) == "2025-06-01"  # the setting wins
    assert partition_start(None, None) == FALLBACK_START  # a SQL landing source: no folder to read
    with pytest.raises(ValueError, match=r"^PERSONA_PARTITION_START='June' is not a day \(YYYY-MM-DD\)$"):
        partition_start("June", landing)


def test_a_process_with_landed_days_and_no_setting_starts_its_partitions_before_them(tmp_path):
    home = tmp_path / "home"
    (home / "landing" / "index_updates" / "date=2026-11-20").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "QDRANT_", "DAGSTER_"))}
    first = "from persona_pipeline.definitions import defs; print(defs.get_job_def('ingest_job')"
    first += ".partitions_def.get_first_partition_key())"
    loaded = subprocess.run(
        [sys.executable, "-c", first], env={**env, "PERSONA_HOME": str(home)}, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "2026-11-13"
