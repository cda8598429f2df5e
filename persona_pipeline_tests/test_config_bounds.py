"""Every number in the feature schema and the service catalog is bounded and every name is given
once: a setting that would pass validation and fail later (NaN and inf vectors, an OverflowError
at run time, two dimensions with one name) is refused when the file loads, naming the file, the
entry and what is wrong."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from persona_pipeline.config_files import ConfigError
from persona_pipeline.feature_schema import FEATURE_SCHEMA_FILE, load_feature_schema
from persona_pipeline.personas.assets import PersonaIndexConfig
from persona_pipeline.resources import VectorIndex
from persona_pipeline.service_catalog import SERVICE_CATALOG_FILE, load_service_catalog

pytestmark = pytest.mark.store_agnostic

CONFIG = Path(__file__).parents[1] / "persona_pipeline" / "config"
CITY = "features[0] ('device.location.city')"
APPS = "features[1] ('device.usage.app_*_duration')"
SIGNAL = "features[2] ('device.connection.signal_strength')"
MOVED = "derived[0] ('derived.location.moved_recently')"


def written_with(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (CONFIG / name).read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "entry", "problem"),
    [
        ("    weight: 0.3", "    weight: .inf", CITY, "weight: input should be a finite number"),
        ("    weight: 0.3", "    weight: .nan", CITY, "weight: input should be a finite number"),
        (
            "    weight: 0.3",
            "    weight: 1.0e+308",
            CITY,
            "weight: input should be less than or equal to 1000",
        ),
        ("clip: [60, 21600]", "clip: [60, 1.0e+308]", APPS, "transform.clip.1: input should be less than"),
        (
            "clip: [60, 21600]",
            "clip: [-.inf, 21600]",
            APPS,
            "transform.clip.0: input should be a finite number",
        ),
        ("    fill: -85", "    fill: -1.0e+300", SIGNAL, "fill: input should be greater than or equal to"),
        ("    days: 7", "    days: 1000000000000", MOVED, "days: input should be less than or equal to 3650"),
        ("expand: [maps, music,", "expand: [maps, maps, music,", APPS, "expand: 'maps' given more than once"),
        (
            "expand: [maps, music,",
            "expand: [maps, 'a.b', music,",
            APPS,
            "expand name 'a.b' is not what '*' matches",
        ),
        ("vocabulary: [Berlin, ", "vocabulary: ['<other>', Berlin, ", CITY, "may not hold '<other>'"),
        (
            "vocabulary: [Berlin, ",
            "vocabulary: [Berlin, Berlin, ",
            CITY,
            "vocabulary: 'Berlin' given more than once",
        ),
        (
            "max_future_skew_hours: 24",
            "max_future_skew_hours: 1.0e+12",
            "limits",
            "less than or equal to 8760",
        ),
        ("max_value_length: 256", "max_value_length: 10000000000", "limits", "less than or equal to 1000000"),
        (
            "  - key: device.connection.signal_strength",
            "  - key: device.usage.app_maps_duration\n    type: numeric\n    transform: {clip: [0, 1]}\n"
            "    weight: 1\n\n  - key: device.connection.signal_strength",
            "top level",
            "dimension names (an expanded key that is also a feature?): 'device.usage.app_maps_duration'",
        ),
    ],
)
def test_a_feature_schema_number_out_of_bounds_or_a_repeated_name_is_refused(
    tmp_path, old, new, entry, problem
):
    path = written_with(tmp_path, FEATURE_SCHEMA_FILE, old, new)
    with pytest.raises(ConfigError) as raised:
        load_feature_schema(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {entry}"), message
    assert problem.lower() in message.lower(), message


LOCAL_DOCS = "services[0] ('localized_support_docs')"
CAR_MOUNT = "services[4] ('car_mount')"


@pytest.mark.parametrize(
    ("old", "new", "entry", "problem"),
    [
        (
            "    cooldown_days: 30",
            "    cooldown_days: 1000000000000",
            LOCAL_DOCS,
            "less than or equal to 3650",
        ),
        ("    cooldown_days: 30", "    cooldown_days: .inf", LOCAL_DOCS, "cooldown_days: input should be"),
        ("    priority: 0.9", "    priority: .nan", LOCAL_DOCS, "priority: input should be a finite number"),
        (
            "eligibility: {apps: [maps]}",
            "eligibility: {apps: [maps, maps]}",
            CAR_MOUNT,
            "'maps' given more than once",
        ),
        (
            "  location_window_days: 7",
            "  location_window_days: 100000",
            "rules",
            "less than or equal to 3650",
        ),
        (
            "  usage_ratio: 2.25",
            "  usage_ratio: .inf",
            "rules",
            "usage_ratio: input should be a finite number",
        ),
        ("  usage_min_seconds: 300", "  usage_min_seconds: 1.0e+300", "rules", "less than or equal to 86400"),
        (
            "  daily_cap: 3",
            "  daily_cap: 1000000",
            "rules",
            "daily_cap: input should be less than or equal to 100",
        ),
        ("  prior_accepted: 1", "  prior_accepted: 1.0e+308", "rules", "less than or equal to 1000000"),
        (
            "  lookalike_per_service: 20",
            "  lookalike_per_service: 10000000000",
            "rules",
            "less than or equal to",
        ),
    ],
)
def test_a_catalog_number_out_of_bounds_or_a_repeated_name_is_refused(tmp_path, old, new, entry, problem):
    path = written_with(tmp_path, SERVICE_CATALOG_FILE, old, new)
    with pytest.raises(ConfigError) as raised:
        load_service_catalog(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {entry}"), message
    assert problem.lower() in message.lower(), message


def test_the_shipped_files_are_within_the_bounds():
    assert load_feature_schema().version and load_service_catalog().spec.services


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: PersonaIndexConfig(batch_size=10**9), "batch_size"),
        (lambda: PersonaIndexConfig(keep_collections=10**6), "keep_collections"),
        (lambda: VectorIndex(timeout_seconds=0), "timeout_seconds"),
        (lambda: VectorIndex(timeout_seconds=10**9), "timeout_seconds"),
    ],
)
def test_run_and_resource_settings_are_bounded(make, problem):
    with pytest.raises(ValidationError, match=problem):
        make()
