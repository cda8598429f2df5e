"""Profile merge, change detection and vector building, without Dagster."""

import uuid

import numpy as np
import pandas as pd
import pytest

from persona_pipeline.feature_schema import load_feature_schema
from persona_pipeline.personas.profiles import (
    device_customers,
    latest_per_device_key,
    value_changes,
)
from persona_pipeline.personas.vectors import build_persona_vectors
from persona_pipeline.resources.vector_index import POINT_NAMESPACE, point_id, point_ids

pytestmark = pytest.mark.store_agnostic


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def profile_rows(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["device_id", "key", "value", "observed_at"])
    frame["observed_at"] = pd.to_datetime(frame["observed_at"], utc=True)
    frame["value_number"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["customer_id"] = None
    return frame


def test_latest_value_wins_whatever_the_order_and_ties_break_by_value():
    rows = profile_rows(
        [
            ("d1", "device.location.city", "Berlin", "2026-03-01T10:00Z"),
            ("d1", "device.location.city", "Munich", "2026-03-02T10:00Z"),
            ("d1", "device.location.city", "Hamburg", "2026-03-01T12:00Z"),
            ("d2", "device.location.city", "Zurich", "2026-03-01T10:00Z"),
            ("d2", "device.location.city", "Amsterdam", "2026-03-01T10:00Z"),
        ]
    )
    forward = latest_per_device_key(rows)
    backward = latest_per_device_key(rows.iloc[::-1])
    pd.testing.assert_frame_equal(forward, backward)
    assert forward.set_index("device_id")["value"].to_dict() == {"d1": "Munich", "d2": "Zurich"}


def test_customer_of_a_device_is_its_most_recent_one():
    rows = profile_rows(
        [
            ("d1", "device.location.city", "Berlin", "2026-03-01T10:00Z"),
            ("d1", "device.model", "Moto G", "2026-03-02T10:00Z"),
        ]
    )
    rows["customer_id"] = ["c-old", "c-new"]
    assert device_customers(rows).to_dict() == {"d1": "c-new"}


def test_value_changes_find_moves_within_the_window_only():
    history = pd.DataFrame(
        [
            ("mover", "Berlin", ts("2026-02-20")),
            ("mover", "Munich", ts("2026-03-05")),
            ("old_mover", "Berlin", ts("2026-01-01")),
            ("old_mover", "Paris", ts("2026-02-01")),
            ("stayer", "Berlin", ts("2026-02-25")),
            ("stayer", "Berlin", ts("2026-03-06")),
            ("newcomer", "Madrid", ts("2026-03-06")),
        ],
        columns=["device_id", "value", "observed_at"],
    )
    changes = value_changes(history, since=ts("2026-03-01"))
    assert changes.to_dict("records") == [
        {
            "device_id": "mover",
            "previous_value": "Berlin",
            "value": "Munich",
            "changed_at": ts("2026-03-05"),
        }
    ]


def test_vectors_weight_transformed_values_per_dimension():
    schema = load_feature_schema()
    profiles = profile_rows(
        [
            ("d1", "device.location.city", "Berlin", "2026-03-01T10:00Z"),
            ("d1", "device.usage.app_maps_duration", "3600", "2026-03-01T10:00Z"),
            ("d1", "device.usage.app_tiktok_duration", "100", "2026-03-01T10:00Z"),
            ("d1", "device.usage.app_zoom_duration", "200", "2026-03-01T10:00Z"),
            ("d1", "device.settings.dark_mode", "true", "2026-03-01T10:00Z"),
            ("d1", "device.os.build", "AP2A", "2026-03-01T10:00Z"),
            ("d2", "device.location.city", "Lisbon", "2026-03-01T10:00Z"),
        ]
    )
    profiles.loc[
        profiles["key"].isin(["device.settings.dark_mode", "device.location.city"]), "value_number"
    ] = np.nan
    vectors = build_persona_vectors(
        profiles,
        pd.Series(dtype=object),
        schema,
        schema.initial_weights(),
        {"derived.location.moved_recently": {"d2"}},
    )
    frame = vectors.frame()
    assert list(frame.index) == ["d1", "d2"]
    assert frame.loc["d1", "device.location.city=Berlin"] == np.float32(0.3)
    assert frame.loc["d2", "device.location.city=<other>"] == np.float32(0.3)
    assert frame.loc["d2", "device.location.city=Berlin"] == 0
    usage_span = np.log1p(21600) - np.log1p(60)  # clip [60, 21600] s, log1p, weight 1.0
    expected_maps = (np.log1p(3600) - np.log1p(60)) / usage_span
    assert np.isclose(frame.loc["d1", "device.usage.app_maps_duration"], expected_maps, rtol=1e-6)
    expected_other = (np.log1p(300) - np.log1p(60)) / usage_span  # two unlisted apps add up
    assert np.isclose(frame.loc["d1", "device.usage.app_*_duration[<other>]"], expected_other, rtol=1e-6)
    expected_total = 0.3 * 3900 / 36000
    assert np.isclose(frame.loc["d1", "derived.usage.total_app_duration"], expected_total, rtol=1e-6)
    assert frame.loc["d1", "device.settings.dark_mode"] == np.float32(0.1)
    # Never reported: the schema's fill value (-85 dBm on -120..-40), weighted 0.2.
    assert np.isclose(frame.loc["d2", "device.connection.signal_strength"], 0.2 * 35 / 80, rtol=1e-6)
    assert frame.loc["d2", "derived.location.moved_recently"] == np.float32(0.6)
    assert frame.loc["d1", "derived.location.moved_recently"] == 0
    assert vectors.matrix.dtype == np.float32


def test_same_time_and_value_with_another_customer_is_decided_by_data_not_order():
    rows = profile_rows(
        [
            ("d1", "device.location.city", "Berlin", "2026-03-01T10:00Z"),
            ("d1", "device.location.city", "Berlin", "2026-03-01T10:00Z"),
        ]
    )
    rows["customer_id"] = ["c-b", "c-a"]
    forward = latest_per_device_key(rows)
    backward = latest_per_device_key(rows.iloc[::-1])
    assert forward["customer_id"].tolist() == backward["customer_id"].tolist() == ["c-b"]


def test_point_ids_of_many_devices_are_their_uuid5():
    devices = ["dev-0000001", "", "Gerät-ü", "a" * 500, "dev-0000001", "x\ty"]
    expected = [str(uuid.uuid5(POINT_NAMESPACE, d)) for d in devices]
    assert point_ids(devices) == expected == [point_id(d) for d in devices]
    assert all(uuid.UUID(p).version == 5 for p in point_ids(devices))
    assert point_ids([]) == []
