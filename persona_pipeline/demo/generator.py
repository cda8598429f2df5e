"""A deterministic demo fleet with planted structure and ground truth. Pure: no Dagster.

Behaviour groups shape app use, models and cities; on top of them the generator
plants devices that move city, heavy users of one app, and failing devices
(signal drops, crash spikes, battery drain), plus a small share of malformed rows
and exact duplicates. The ground truth is written beside the landing zone, never
in it, so later stages can measure themselves against it.

`FleetParameters` varies the fleet (the scenarios of `persona-pipeline evaluate decisions`):
the shares of movers, heavy users and failing devices, a latent interest in one app that
usage reveals only a little, and fleets that report only the seed's three key families.
The defaults are the demo fleet, drawn exactly as before: the new parameters draw from
their own random stream, and a share only moves the threshold of draws made anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CITIES = np.array(
    [
        "Berlin",
        "Munich",
        "Hamburg",
        "Cologne",
        "Frankfurt",
        "Vienna",
        "Zurich",
        "Paris",
        "Amsterdam",
        "Madrid",
        "Lisbon",
    ]
)  # Lisbon is outside the schema's vocabulary
MODELS = np.array(["Pixel 8", "Galaxy S24", "iPhone 15", "Xperia 5", "Moto G", "Nokia X30"])
CONNECTIONS = np.array(["wifi", "5g", "4g", "3g"])
APPS = np.array(["maps", "music", "video", "social", "games", "fitness", "news", "camera"])
EXTRA_APP = "podcast"  # not in the schema's expand list: lands in the "other" dimension

# Mean minutes per day of each app (columns: APPS) for each behaviour group.
GROUPS = {
    "commuter": [55, 60, 10, 20, 5, 5, 25, 5],
    "gamer": [5, 20, 60, 25, 150, 2, 3, 5],
    "fitness": [25, 50, 10, 15, 5, 70, 5, 10],
    "reader": [5, 10, 15, 50, 5, 3, 70, 5],
    "creator": [10, 20, 45, 80, 10, 5, 5, 60],
    "light": [5, 5, 5, 8, 3, 2, 5, 3],
}
GROUP_SHARE = [0.22, 0.15, 0.15, 0.16, 0.12, 0.20]
GROUP_MODEL_BIAS = {"gamer": 1, "creator": 2, "light": 4, "fitness": 0}
GROUP_CITY_BIAS = {"commuter": [0, 1, 2], "creator": [5, 7, 8], "reader": [3, 4, 6]}

MOVER_SHARE = 0.04
HEAVY_SHARE = 0.05
FAILING_SHARE = 0.02
MALFORMED_SHARE = 0.01
DUPLICATE_SHARE = 0.005
# A device with a latent interest uses its app this much more than its group does: a hint in
# the usage, far below a heavy user's 5x (the usage trigger's 2.25x a segment's median).
LATENT_USAGE_LIFT = 1.6
# The key families of the seed's contract; a fleet with `seed_keys_only` reports nothing else.
SEED_KEY_FAMILIES = (
    "device.location.city",
    "device.usage.app_*_duration",
    "device.connection.signal_strength",
)


@dataclass(frozen=True)
class FleetParameters:
    """What a generated fleet plants. The defaults are the demo fleet's."""

    movers: float = MOVER_SHARE  # share of devices that move city in the second half of the days
    heavy: float = HEAVY_SHARE  # share (among those that do not move) using one app 5x more
    failing: float = FAILING_SHARE  # share (among the rest) failing from a day in the second half
    latent: float = 0.0  # share with a latent interest in one app, used LATENT_USAGE_LIFT x more
    seed_keys_only: bool = False  # report only the SEED_KEY_FAMILIES
    # Share of devices that report on a day after the first (all report on the first day, and a
    # device reports on the day it moves or starts failing); the others send nothing that day.
    reporting: float = 1.0

    def __post_init__(self) -> None:
        for name in ("movers", "heavy", "failing", "latent", "reporting"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"FleetParameters.{name}={share}: a share between 0 and 1")


@dataclass
class DemoFleet:
    updates: dict[str, pd.DataFrame]  # day -> rows (device_id, customer_id, key, value, observed_at)
    devices: pd.DataFrame  # ground truth per device
    malformed: pd.DataFrame  # ground truth of the malformed rows planted


def _weights(n: int, favoured: list[int], boost: float) -> np.ndarray:
    weights = np.ones(n)
    weights[favoured] *= boost
    return weights / weights.sum()


def plant_devices(
    devices: int, days: int, rng: np.random.Generator, parameters: FleetParameters = FleetParameters()
) -> pd.DataFrame:
    """Who each device is: group, home city, model, and the planted behaviours."""
    ids = pd.Series(np.arange(devices)).map("dev-{:06d}".format)
    owners = np.minimum(np.arange(devices) - rng.binomial(1, 0.1, devices), devices - 1).clip(0)
    group_names = np.array(list(GROUPS))
    group = rng.choice(group_names, size=devices, p=GROUP_SHARE)
    city = np.empty(devices, dtype=object)
    model = np.empty(devices, dtype=object)
    for name in group_names:
        members = group == name
        city_p = _weights(len(CITIES), GROUP_CITY_BIAS.get(name, []), 3.0)
        model_p = _weights(len(MODELS), [GROUP_MODEL_BIAS[name]] if name in GROUP_MODEL_BIAS else [], 4.0)
        city[members] = rng.choice(CITIES, size=members.sum(), p=city_p)
        model[members] = rng.choice(MODELS, size=members.sum(), p=model_p)

    moved = rng.random(devices) < parameters.movers
    offset = rng.integers(1, len(CITIES), size=devices)
    new_city = np.where(moved, CITIES[(_city_index(city) + offset) % len(CITIES)], None)
    move_day = np.where(moved, rng.integers(max(days // 2, 1), max(days, 2), size=devices), -1)

    heavy = (rng.random(devices) < parameters.heavy) & ~moved
    heavy_app = np.where(heavy, rng.choice(APPS, size=devices), None)

    failing = (rng.random(devices) < parameters.failing) & ~moved & ~heavy
    failure_start = np.where(failing, rng.integers(max(days // 2, 1), max(days, 2), size=devices), -1)

    return pd.DataFrame(
        {
            "device_id": ids,
            "customer_id": pd.Series(owners).map("cust-{:06d}".format),
            "group": group,
            "home_city": city,
            "model": model,
            "moved": moved,
            "new_city": new_city,
            "move_day": move_day,
            "heavy_user": heavy,
            "heavy_app": heavy_app,
            "failing": failing,
            "failure_start_day": failure_start,
            "usage_scale": rng.lognormal(0.0, 0.35, devices),
            "dark_mode": rng.random(devices) < np.where(np.isin(group, ["gamer", "creator"]), 0.8, 0.35),
            "has_podcasts": rng.random(devices) < 0.2,
            "os_build": rng.choice(["AP2A.240905", "UQ1A.240205", "TP1A.221005"], size=devices),
        }
    )


def _city_index(city: np.ndarray) -> np.ndarray:
    order = {name: i for i, name in enumerate(CITIES)}
    return pd.Series(city).map(order).to_numpy(dtype=np.int64)


def day_updates(
    truth: pd.DataFrame, day_number: int, day: pd.Timestamp, rng: np.random.Generator
) -> pd.DataFrame:
    """All updates of one day, one column-vector per key (no per-device loop)."""
    n = len(truth)
    moved_now = truth["moved"].to_numpy() & (day_number >= truth["move_day"].to_numpy())
    city = np.where(moved_now, truth["new_city"], truth["home_city"])
    failing_now = truth["failing"].to_numpy() & (day_number >= truth["failure_start_day"].to_numpy())
    group_means = np.array([GROUPS[g] for g in truth["group"]], dtype=float) * 60.0
    usage = group_means * truth["usage_scale"].to_numpy()[:, None] * rng.lognormal(0, 0.25, (n, len(APPS)))
    heavy_column = pd.Series(truth["heavy_app"]).map({a: i for i, a in enumerate(APPS)})
    heavy_rows = np.flatnonzero(heavy_column.notna().to_numpy())
    usage[heavy_rows, heavy_column.iloc[heavy_rows].to_numpy(dtype=int)] *= 5.0
    if "latent_app" in truth:
        latent_column = pd.Series(truth["latent_app"]).map({a: i for i, a in enumerate(APPS)})
        latent_rows = np.flatnonzero(latent_column.notna().to_numpy())
        usage[latent_rows, latent_column.iloc[latent_rows].to_numpy(dtype=int)] *= LATENT_USAGE_LIFT
    usage = np.clip(np.round(usage), 0, 86_400)

    signal = np.where(failing_now, rng.normal(-110, 4, n), rng.normal(-70, 7, n))
    crashes = np.where(failing_now, rng.integers(8, 30, n), rng.poisson(0.3, n))
    drain = np.where(failing_now, rng.normal(20, 3, n), rng.normal(5, 1.5, n)).clip(0.5)

    columns: dict[str, np.ndarray] = {
        "device.location.city": city,
        "device.connection.type": rng.choice(CONNECTIONS, size=n, p=[0.45, 0.25, 0.25, 0.05]),
        "device.connection.signal_strength": np.round(signal).astype(int),
        "device.battery.level": rng.integers(15, 101, n),
        "device.battery.drain_rate": np.round(drain, 1),
        "device.health.crash_count": crashes,
        "device.storage.free_gb": np.round(rng.lognormal(3.3, 0.8, n), 1),
    }
    for i, app in enumerate(APPS):
        columns[f"device.usage.app_{app}_duration"] = usage[:, i].astype(int)
    if day_number == 0:
        columns["device.model"] = truth["model"].to_numpy()
        columns["device.settings.dark_mode"] = truth["dark_mode"].to_numpy()
        columns["device.os.build"] = truth["os_build"].to_numpy()

    frames = [
        pd.DataFrame(
            {
                "device_id": truth["device_id"],
                "customer_id": truth["customer_id"],
                "key": key,
                "value": pd.Series(values, dtype=object),
            }
        )
        for key, values in columns.items()
    ]
    podcast = truth["has_podcasts"].to_numpy()
    frames.append(
        pd.DataFrame(
            {
                "device_id": truth["device_id"][podcast],
                "customer_id": truth["customer_id"][podcast],
                "key": f"device.usage.app_{EXTRA_APP}_duration",
                "value": pd.Series(rng.integers(600, 7200, podcast.sum()), dtype=object).to_numpy(),
            }
        )
    )
    rows = pd.concat(frames, ignore_index=True)
    seconds = rng.integers(0, 86_400, len(rows))
    stamps = day + pd.to_timedelta(seconds, unit="s")
    local = rng.random(len(rows)) < 0.3  # some exporters write local time with +01:00
    rows["observed_at"] = np.where(
        local,
        (stamps + pd.Timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00"),
        stamps.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return rows


MALFORMED_KINDS = (
    "empty_device_id",
    "bad_timestamp",
    "text_for_number",
    "not_finite",
    "too_long",
    "no_offset",
)


def plant_malformed(rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Copies of random rows, each broken in one way (the good originals stay)."""
    count = max(1, int(len(rows) * MALFORMED_SHARE))
    broken = rows.sample(n=count, random_state=int(rng.integers(0, 2**31))).reset_index(drop=True)
    kind = rng.choice(MALFORMED_KINDS, size=count)
    broken["value"] = broken["value"].astype(object)
    broken.loc[kind == "empty_device_id", "device_id"] = ""
    broken.loc[kind == "bad_timestamp", "observed_at"] = "yesterday at noon"
    broken.loc[kind == "text_for_number", "key"] = "device.connection.signal_strength"
    broken.loc[kind == "text_for_number", "value"] = "weak"
    broken.loc[kind == "not_finite", "key"] = "device.battery.level"
    broken.loc[kind == "not_finite", "value"] = "inf"
    broken.loc[kind == "too_long", "value"] = "x" * 300
    broken.loc[kind == "no_offset", "observed_at"] = broken.loc[kind == "no_offset", "observed_at"].str.slice(
        0, 19
    )
    broken["malformed_kind"] = kind
    return broken


def plant_latent_interest(truth: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """A `latent_app` per device (None for most): an app the person would take offers about.
    Drawn from a stream of its own, so the rest of the fleet is the same with or without it."""
    rng = np.random.default_rng([seed, 1])
    interested = rng.random(len(truth)) < share
    apps = rng.choice(APPS, size=len(truth))
    return truth.assign(latent_app=np.where(interested, apps, None))


def seed_keys_mask(keys: pd.Series) -> np.ndarray:
    """Which rows carry one of the SEED_KEY_FAMILIES (a pattern's `*` is one name part)."""
    pattern = "|".join(family.replace(".", r"\.").replace("*", r"[^.]+") for family in SEED_KEY_FAMILIES)
    return keys.astype(str).str.fullmatch(pattern).to_numpy(dtype=bool)


def reporting_devices(truth: pd.DataFrame, day_number: int, share: float, seed: int) -> pd.Series:
    """The devices that report on `day_number`: a draw of `share` (its own random stream, so the
    fleet's other draws stay as they are), and every device that moves or starts failing that day."""
    drawn = np.random.default_rng([seed, day_number]).random(len(truth)) < share
    moves = truth["move_day"].to_numpy() == day_number
    fails = truth["failure_start_day"].to_numpy() == day_number
    event = moves | fails
    return truth.loc[drawn | event, "device_id"]


def generate_fleet(
    devices: int, days: int, seed: int, start: str, parameters: FleetParameters = FleetParameters()
) -> DemoFleet:
    rng = np.random.default_rng(seed)
    truth = plant_devices(devices, days, rng, parameters)
    if parameters.latent > 0:
        truth = plant_latent_interest(truth, parameters.latent, seed)
    updates, malformed = {}, []
    first = pd.Timestamp(start, tz="UTC")
    for day_number in range(days):
        day = first + pd.Timedelta(days=day_number)
        label = day.strftime("%Y-%m-%d")
        rows = day_updates(truth, day_number, day, rng)
        if parameters.reporting < 1.0 and day_number > 0:
            reporting = reporting_devices(truth, day_number, parameters.reporting, seed)
            rows = rows[rows["device_id"].isin(reporting)].reset_index(drop=True)
        if parameters.seed_keys_only:
            rows = rows[seed_keys_mask(rows["key"])].reset_index(drop=True)
        duplicates = rows.sample(frac=DUPLICATE_SHARE, random_state=int(rng.integers(0, 2**31)))
        broken = plant_malformed(rows, rng)
        if parameters.seed_keys_only:  # a malformed row may name another key (not_finite)
            broken = broken[seed_keys_mask(broken["key"])].reset_index(drop=True)
        malformed.append(broken.assign(day=label))
        mixed = pd.concat([rows, duplicates, broken.drop(columns="malformed_kind")], ignore_index=True)
        updates[label] = mixed.sample(frac=1.0, random_state=int(rng.integers(0, 2**31))).reset_index(
            drop=True
        )
    return DemoFleet(updates, truth.drop(columns=["usage_scale"]), pd.concat(malformed, ignore_index=True))


def write_landing(fleet: DemoFleet, landing: Path) -> list[Path]:
    """Each day as three files, one per supported format, in `index_updates/date=.../`."""
    written = []
    for day, rows in fleet.updates.items():
        folder = landing / "index_updates" / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        thirds = np.array_split(np.arange(len(rows)), [len(rows) // 2, len(rows) * 4 // 5])
        parquet, jsonl, csv = (rows.iloc[part] for part in thirds)
        parquet.assign(value=parquet["value"].astype(str)).to_parquet(folder / "part-0.parquet", index=False)
        jsonl.to_json(folder / "part-1.jsonl", orient="records", lines=True, force_ascii=False)
        csv.to_csv(folder / "part-2.csv", index=False)
        written.extend([folder / "part-0.parquet", folder / "part-1.jsonl", folder / "part-2.csv"])
    return written


def write_ground_truth(fleet: DemoFleet, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fleet.devices.to_csv(folder / "devices.csv", index=False)
    fleet.malformed.to_csv(folder / "malformed_rows.csv", index=False)
