from pathlib import Path

import numpy as np
import pytest

from persona_pipeline.config_files import ConfigError
from persona_pipeline.feature_schema import load_feature_schema

pytestmark = pytest.mark.store_agnostic

SHIPPED = Path(__file__).parents[1] / "persona_pipeline" / "config" / "feature_schema.yaml"


def test_shipped_schema_has_the_seed_weights_and_derived_metrics():
    schema = load_feature_schema()
    weights = schema.initial_weights()
    assert weights["device.location.city"] == 0.3
    assert weights["device.usage.app_*_duration"] == 1.0
    assert weights["device.connection.signal_strength"] == 0.2
    kinds = {d.kind for d in schema.derived}
    assert kinds == {"changed_within_days", "sum"}
    assert len(schema.dimension_names) == len(set(schema.dimension_names))


def test_key_types_resolve_exact_keys_and_patterns():
    schema = load_feature_schema()
    types = schema.key_types(
        [
            "device.location.city",
            "device.usage.app_tiktok_duration",
            "device.settings.dark_mode",
            "device.os.build",
        ]
    )
    assert types == {
        "device.location.city": "categorical",
        "device.usage.app_tiktok_duration": "numeric",
        "device.settings.dark_mode": "boolean",
        "device.os.build": None,
    }


def test_learned_weight_of_a_concrete_key_overrides_its_pattern():
    schema = load_feature_schema()
    weights = schema.dimension_weights({"device.usage.app_maps_duration": 0.9})
    names = schema.dimension_names
    assert weights[names.index("device.usage.app_maps_duration")] == 0.9
    assert weights[names.index("device.usage.app_music_duration")] == 1.0


def test_version_ignores_weights_but_not_shape(tmp_path):
    base = load_feature_schema().version
    text = SHIPPED.read_text()
    (tmp_path / "feature_schema.yaml").write_text(text.replace("weight: 0.3", "weight: 0.7"))
    assert load_feature_schema(tmp_path).version == base
    (tmp_path / "feature_schema.yaml").write_text(text.replace("label: crashes", "label: crash count"))
    relabelled = load_feature_schema(tmp_path)
    assert relabelled.version == base
    assert relabelled.label_for("device.health.crash_count") == "crash count"
    (tmp_path / "feature_schema.yaml").write_text(text.replace("Berlin, ", ""))
    assert load_feature_schema(tmp_path).version != base


def test_override_folder_wins_over_shipped_default(tmp_path, monkeypatch):
    (tmp_path / "feature_schema.yaml").write_text(
        "features:\n  - {key: device.location.city, type: categorical, vocabulary: [Oslo], weight: 1.0}\n"
    )
    monkeypatch.setenv("PERSONA_CONFIG_DIR", str(tmp_path))
    schema = load_feature_schema()
    assert schema.dimension_names == ["device.location.city=Oslo", "device.location.city=<other>"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("features: [\n", "invalid YAML at line"),
        ("- just a list\n", "expected a mapping at the top level"),
        (
            "features:\n  - {key: device.location.city, type: categorical, weight: 0.8}\n",
            "features[0] ('device.location.city'): a categorical feature needs a non-empty vocabulary",
        ),
        (
            "features:\n  - {key: device.battery.level, type: numeric, weight: -1,\n"
            "     transform: {clip: [0, 100]}}\n",
            "features[0] ('device.battery.level'): weight: Input should be greater than or equal to 0",
        ),
        (
            "features:\n  - {key: device.battery.level, type: numeric, weight: 1,\n"
            "     transform: {clip: [100, 0]}}\n",
            "clip must be two finite numbers, low < high",
        ),
        (
            "features:\n  - {key: battery, type: boolean, weight: 1}\n",
            "key 'battery' is not a dotted key",
        ),
        (
            "features:\n  - {key: device.a.b, type: boolean, weight: 1, colour: red}\n",
            "features[0] ('device.a.b'): colour: Extra inputs are not permitted",
        ),
    ],
)
def test_invalid_schema_names_file_entry_and_problem(tmp_path, content, expected):
    path = tmp_path / "feature_schema.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_feature_schema(tmp_path)
    message = str(raised.value)
    assert str(path) in message
    assert expected.lower() in message.lower()


def test_numeric_transform_scales_into_unit_range():
    schema = load_feature_schema()
    signal = next(f for f in schema.features if f.key == "device.connection.signal_strength")
    scaled = signal.transform.apply(np.array([-200.0, -120.0, -80.0, -40.0, 0.0]))
    np.testing.assert_allclose(scaled, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_labels_and_units_name_keys_dimensions_and_derived_metrics():
    schema = load_feature_schema()
    assert schema.label_for("device.usage.app_maps_duration") == "maps use"
    assert schema.label_for("device.usage.app_podcast_duration") == "podcast use"
    assert schema.label_for("device.usage.app_*_duration[<other>]") == "other use"
    assert schema.unit_for("device.usage.app_*_duration[<other>]") == "seconds"
    assert schema.label_for("derived.location.moved_recently") == "moved city within 7 days"
    assert (
        schema.label_for("device.connection.signal_strength"),
        schema.unit_for("device.connection.signal_strength"),
    ) == ("signal", "dBm")
    assert schema.label_for("device.os.build") == "os.build"  # not in the schema: the key itself
    assert schema.unit_for("device.os.build") is None


def edited(text: str, old: str, new: str) -> tuple[str, int]:
    """`text` with the first line `old` replaced by `new`, and that line's number."""
    lines = text.splitlines()
    number = lines.index(old)
    lines[number] = new
    return "\n".join(lines) + "\n", number + 1


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    label: city", "    label: city: of residence", "mapping values are not allowed here"),
        ("    label: city", "\tlabel: city", "found character '\\t' that cannot start any token"),
        ("    weight: 0.3", "    weight: 0.3\n    weight: 0.9", "key 'weight' is given twice in one mapping"),
    ],
    ids=["colon", "tab", "twice"],
)
def test_a_yaml_mistake_in_an_edited_schema_names_the_file_and_the_line(tmp_path, old, new, expected):
    text, line = edited(SHIPPED.read_text(), old, new)
    path = tmp_path / "feature_schema.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_feature_schema(tmp_path)
    message = str(raised.value)
    wrong_line = line + 1 if "twice" in expected else line  # the second `weight` is the mistake
    assert message.startswith(f"{path}: invalid YAML at line {wrong_line}, column ")
    assert expected in message


def test_each_key_has_a_role_and_a_move_is_behaviour_never_health(tmp_path):
    schema = load_feature_schema()
    roles = dict(zip(schema.dimension_names, schema.dimension_roles, strict=True))
    assert roles["device.health.crash_count"] == roles["device.connection.signal_strength"] == "health"
    assert roles["device.usage.app_maps_duration"] == roles["device.usage.app_*_duration[<other>]"]
    assert roles["device.usage.app_maps_duration"] == "behaviour"
    assert roles["derived.location.moved_recently"] == "behaviour"
    assert roles["device.location.city=Berlin"] == roles["device.model=<other>"] == "context"
    assert schema.role_for("device.usage.app_podcast_duration") == "behaviour"
    assert schema.role_for("device.os.build") == "context"  # not in the schema
    # An entry without a role is context; a role is meaning, not shape: the version stays.
    text = SHIPPED.read_text().replace("    role: health\n", "", 1)
    (tmp_path / "feature_schema.yaml").write_text(text)
    unroled = load_feature_schema(tmp_path)
    assert unroled.role_for("device.connection.signal_strength") == "context"
    assert unroled.version == schema.version


@pytest.mark.parametrize(
    ("old", "new", "entry", "problem"),
    [
        (
            "    role: context",
            "    role: fault",
            "features[0] ('device.location.city')",
            "role: Input should be 'health', 'behaviour' or 'context'",
        ),
        (
            "    role: behaviour\n    weight: 0.6",
            "    role: health\n    weight: 0.6",
            "derived[0] ('derived.location.moved_recently')",
            "a change of a key (changed_within_days) is behaviour or context, never health",
        ),
    ],
)
def test_an_unknown_role_or_a_move_as_health_is_refused(tmp_path, old, new, entry, problem):
    text = SHIPPED.read_text()
    assert old in text
    path = tmp_path / "feature_schema.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as raised:
        load_feature_schema(tmp_path)
    assert f"{path}: {entry}: {problem}" in str(raised.value)
