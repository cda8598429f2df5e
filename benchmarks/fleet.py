"""A benchmark fleet: N devices, about U updates each per day, as Parquet in the landing zone.

Vectorized with NumPy and Arrow: no Python loop over devices or rows, so generating 10M
updates takes seconds. Devices belong to behaviour groups (the demo generator's), which
shape their app use, model and city, so segments have something to find. A small share of
rows is malformed, so the reject path runs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from persona_pipeline.demo.generator import APPS, CITIES, CONNECTIONS, EXTRA_APP, GROUP_SHARE, GROUPS, MODELS

ROWS_PER_FILE = 2_000_000
APP_KEYS = [f"device.usage.app_{app}_duration" for app in (*APPS, EXTRA_APP)]
# Key of each update and how often it is reported; the apps share USAGE_SHARE.
USAGE_SHARE = 0.40
OTHER_KEYS = {
    "device.location.city": 0.05,
    "device.connection.signal_strength": 0.10,
    "device.connection.type": 0.08,
    "device.model": 0.02,
    "device.battery.level": 0.15,
    "device.battery.drain_rate": 0.08,
    "device.health.crash_count": 0.05,
    "device.storage.free_gb": 0.04,
    "device.settings.dark_mode": 0.03,
}
KEYS = [*APP_KEYS, *OTHER_KEYS]
KEY_SHARE = np.array([USAGE_SHARE / len(APP_KEYS)] * len(APP_KEYS) + list(OTHER_KEYS.values()))


@dataclass(frozen=True)
class Devices:
    """Who each device is (fixed by the seed, the same on every day)."""

    ids: pa.Array
    customers: pa.Array
    group: np.ndarray  # index into GROUPS
    city: np.ndarray  # index into CITIES
    model: np.ndarray  # index into MODELS
    usage_scale: np.ndarray
    failing: np.ndarray  # bool: bad signal, crashes, battery drain


def make_devices(count: int, seed: int) -> Devices:
    rng = np.random.default_rng(seed)
    numbers = pa.array(np.arange(count)).cast(pa.string())
    ids = pc.binary_join_element_wise("dev-", pc.utf8_lpad(numbers, 7, "0"), "")
    owners = pa.array(np.arange(count) * 10 // 11).cast(pa.string())
    customers = pc.binary_join_element_wise("cust-", pc.utf8_lpad(owners, 7, "0"), "")
    group = rng.choice(len(GROUPS), size=count, p=GROUP_SHARE)
    # Each group favours a few cities and one model; the rest are spread evenly.
    city = np.where(rng.random(count) < 0.5, (group * 2 + rng.integers(0, 2, count)) % 10, 0)
    city = np.where(city == 0, rng.integers(0, len(CITIES), count), city)
    model = np.where(rng.random(count) < 0.6, group % len(MODELS), rng.integers(0, len(MODELS), count))
    return Devices(
        ids=ids,
        customers=customers,
        group=group,
        city=city,
        model=model,
        usage_scale=rng.lognormal(0.0, 0.35, count),
        failing=rng.random(count) < 0.01,
    )


def day_updates(
    devices: Devices,
    day: str,
    updates_per_device: int,
    seed: int,
    rows: np.ndarray | None = None,
    moved_share: float = 0.0,
    bad_share: float = 0.001,
) -> pa.Table:
    """One day of updates, `updates_per_device` per device (of `rows`, default every device),
    in random order. `moved_share` of those devices report a city other than their home's."""
    rng = np.random.default_rng([seed, date.fromisoformat(day).toordinal()])
    rows = np.arange(len(devices.group)) if rows is None else rows
    device = rng.permutation(np.repeat(rows, updates_per_device))
    key = rng.choice(len(KEYS), size=len(device), p=KEY_SHARE)
    by_key = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[by_key], np.arange(len(KEYS) + 1))
    moved = np.zeros(len(devices.group), dtype=bool)
    moved[rows[rng.random(len(rows)) < moved_share]] = True
    values = [
        _values(name, device[by_key[bounds[k] : bounds[k + 1]]], devices, moved, rng)
        for k, name in enumerate(KEYS)
    ]
    inverse = np.empty_like(by_key)
    inverse[by_key] = np.arange(len(by_key))
    value = pa.concat_arrays(values).take(pa.array(inverse))

    second = rng.integers(0, 86_400, len(device))
    local = rng.random(len(device)) < 0.3  # some exporters write local time (+01:00)
    observed_at = _timestamps(day, second + 3600 * local, np.where(local, "+01:00", "Z"))

    table = pa.table(
        {
            "device_id": devices.ids.take(pa.array(device)),
            "customer_id": devices.customers.take(pa.array(device)),
            "key": _pick(np.array(KEYS), key),
            "value": value,
            "observed_at": observed_at,
        }
    )
    return _break_some(table, bad_share, rng)


def _timestamps(day: str, second: np.ndarray, offset: np.ndarray) -> pa.Array:
    """ISO-8601 text of `day` + `second` (which may run into the next day) with `offset`
    (Arrow's strftime takes seconds per million rows; this takes a tenth of that)."""
    next_day = (pd.Timestamp(day) + pd.Timedelta(days=1)).strftime("%Y-%m-%d")
    date = pc.if_else(pa.array(second >= 86_400), next_day + "T", day + "T")
    second = second % 86_400
    parts = [second // 3600, second // 60 % 60, second % 60]
    hh, mm, ss = (pc.utf8_lpad(pa.array(part).cast(pa.string()), 2, "0") for part in parts)
    return pc.binary_join_element_wise(date, hh, ":", mm, ":", ss, pa.array(offset), "")


def _values(name: str, who: np.ndarray, devices: Devices, moved: np.ndarray, rng) -> pa.Array:
    n = len(who)
    failing = devices.failing[who]
    if name in APP_KEYS:
        app = APP_KEYS.index(name)
        minutes = np.array([GROUPS[g][app] for g in GROUPS])[devices.group[who]] if app < len(APPS) else 30
        seconds = minutes * 60.0 * devices.usage_scale[who] * rng.lognormal(0, 0.25, n)
        return _text(np.clip(np.round(seconds), 0, 86_400).astype(np.int64))
    if name == "device.location.city":
        home = devices.city[who]
        city = np.where(moved[who], (home + rng.integers(1, len(CITIES), n)) % len(CITIES), home)
        return _pick(CITIES, city)
    if name == "device.model":
        return _pick(MODELS, devices.model[who])
    if name == "device.connection.type":
        return _pick(CONNECTIONS, rng.choice(len(CONNECTIONS), size=n, p=[0.45, 0.25, 0.25, 0.05]))
    if name == "device.settings.dark_mode":
        return _pick(np.array(["false", "true"]), (devices.group[who] % 2 == 1).astype(int))
    if name == "device.connection.signal_strength":
        dbm = np.where(failing, rng.normal(-110, 4, n), rng.normal(-70, 7, n))
        return _text(np.round(dbm).astype(np.int64))
    if name == "device.battery.level":
        return _text(rng.integers(15, 101, n))
    if name == "device.battery.drain_rate":
        return _text(np.round(np.where(failing, rng.normal(20, 3, n), rng.normal(5, 1.5, n)).clip(0.5), 1))
    if name == "device.health.crash_count":
        return _text(np.where(failing, rng.integers(8, 30, n), rng.poisson(0.3, n)))
    if name == "device.storage.free_gb":
        return _text(np.round(rng.lognormal(3.3, 0.8, n), 1))
    raise ValueError(f"no values for {name}")


def _text(numbers: np.ndarray) -> pa.Array:
    return pa.array(numbers).cast(pa.string())


def _pick(vocabulary: np.ndarray, index: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), pa.array(vocabulary)).cast(pa.string())


def _break_some(table: pa.Table, share: float, rng) -> pa.Table:
    """A text value for a number, a timestamp without offset, or an empty device_id."""
    kind = np.where(rng.random(len(table)) < share, rng.integers(1, 4, len(table)), 0)
    if not kind.any():
        return table
    value = pc.if_else(pa.array(kind == 1), "weak", table["value"])
    stamp = table["observed_at"].combine_chunks()
    naive = pc.utf8_slice_codeunits(stamp, 0, 19)
    observed_at = pc.if_else(pa.array(kind == 2), naive, stamp)
    device_id = pc.if_else(pa.array(kind == 3), "", table["device_id"])
    return (
        table.set_column(3, "value", value)
        .set_column(4, "observed_at", observed_at)
        .set_column(0, "device_id", device_id)
    )


def write_day(table: pa.Table, landing: Path, day: str) -> list[Path]:
    """The day's updates as Parquet files in `index_updates/date=<day>/` (landing contract)."""
    folder = landing / "index_updates" / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, start in enumerate(range(0, max(len(table), 1), ROWS_PER_FILE)):
        path = folder / f"part-{number:05d}.parquet"
        pq.write_table(table.slice(start, ROWS_PER_FILE), path)
        written.append(path)
    return written


def changed_devices(count: int, share: float, seed: int) -> np.ndarray:
    """The devices that change on the incremental day (sorted row numbers)."""
    rng = np.random.default_rng([seed, 2])
    return np.sort(rng.choice(count, size=max(1, round(count * share)), replace=False))
