"""`python -m benchmarks.history_reads --devices 100000 --days 7`: which engine reads the update
history, chosen on measurements.

The history's two reads that grow with the fleet, on a history written by the pipeline's own
writer (resources/update_history.py): every day a full day of the benchmark fleet (an upper
bound: a real day after the first holds the changed devices only).
- **day**: one day's six columns into a pandas frame (what device_profiles reads);
- **key history**: one key's rows (device_id, value, observed_at) over every day into a pandas
  frame (what the derived-metric and city-move reads filter on).
Each engine runs in a process of its own (its peak RSS is its own) and its results are checked
against the first engine's (rows, devices, newest event).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pandas as pd

from benchmarks.fleet import day_updates, make_devices
from benchmarks.measure import Measured, human_bytes, machine_line, report, run_measured

ENGINES = ("pyarrow", "duckdb", "polars")
FIRST_DAY = "2026-11-01"
KEY = "device.location.city"
DAY_COLUMNS = ["device_id", "customer_id", "key", "value", "value_number", "observed_at"]
KEY_COLUMNS = ["device_id", "value", "observed_at"]


def build(root: Path, devices: int, days: int) -> list[str]:
    """A history of `days` full days, written by the pipeline's writer."""
    from persona_pipeline.resources.update_history import UpdateHistory

    history = UpdateHistory(root)
    fleet = make_devices(devices, 7)
    written = []
    for number in range(days):
        day = (date.fromisoformat(FIRST_DAY) + timedelta(days=number)).isoformat()
        raw = day_updates(fleet, day, 10, 7 + number).to_pandas()
        accepted = raw.assign(
            partition_date=day,
            observed_at=pd.to_datetime(raw["observed_at"], utc=True, format="ISO8601", errors="coerce"),
            value_number=pd.to_numeric(raw["value"], errors="coerce"),
            source_file="bench.parquet",
            source_row=range(len(raw)),
        ).dropna(subset=["device_id", "key", "value", "observed_at"])
        history.write_days([day], accepted[accepted["device_id"] != ""])
        written.append(day)
    return written


def read_pyarrow(files: list[str], columns: list[str], key: str | None) -> pd.DataFrame:
    import pyarrow.dataset as ds

    from persona_pipeline.resources.update_history import SCHEMA

    dataset = ds.dataset(files, schema=SCHEMA, format="parquet")
    return dataset.to_table(
        columns=columns, filter=None if key is None else ds.field("key") == key
    ).to_pandas()


def read_duckdb(files: list[str], columns: list[str], key: str | None) -> pd.DataFrame:
    import duckdb

    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    query = f"SELECT {', '.join(columns)} FROM read_parquet(?)" + ("" if key is None else " WHERE key = ?")
    return connection.execute(query, [files] if key is None else [files, key]).df()


def read_polars(files: list[str], columns: list[str], key: str | None) -> pd.DataFrame:
    import polars as pl

    scan = pl.scan_parquet(files)
    if key is not None:
        scan = scan.filter(pl.col("key") == key)
    return scan.select(columns).collect().to_pandas()


READERS = {"pyarrow": read_pyarrow, "duckdb": read_duckdb, "polars": read_polars}
MODULES = {"pyarrow": "pyarrow.dataset", "duckdb": "duckdb", "polars": "polars"}


def run_one(engine: str, work: str, root: Path) -> None:
    """In a child process: time one engine on one read and report its result."""
    from persona_pipeline.resources.update_history import UpdateHistory

    history = UpdateHistory(root)
    days = history.days()
    day_files = [str(path) for path in history.files(days[:1])]
    every_file = [str(path) for path in history.files(days)]
    importlib.import_module(MODULES[engine])  # imported before the clock starts, as in the pipeline
    started = time.perf_counter()
    if work == "day":
        frame = READERS[engine](day_files, DAY_COLUMNS, None)
    else:
        frame = READERS[engine](every_file, KEY_COLUMNS, KEY)
    seconds = time.perf_counter() - started
    newest = pd.to_datetime(frame["observed_at"], utc=True).max()
    report(seconds, rows=len(frame), devices=int(frame["device_id"].nunique()), newest=newest.isoformat())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history_reads", description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine; the table shows the median")
    parser.add_argument("--work", type=Path, default=Path(".bench/history"))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--one", nargs=3, metavar=("ENGINE", "WORK", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], args.one[1], Path(args.one[2]))
        return

    print(machine_line(), flush=True)
    root = (args.work / f"history-{args.devices}-{args.days}").resolve()
    if not root.is_dir():
        build(root, args.devices, args.days)
    print(f"{args.devices:,} devices x 10 updates, {args.days} full days", flush=True)
    print(f"{'read':12} {'engine':8} {'seconds':>8} {'peak RSS':>10}  rows, devices, newest event")
    for work in ("day", "key history"):
        results: dict[str, Measured] = {}
        for engine in args.engines.split(","):
            command = [sys.executable, "-m", "benchmarks.history_reads", "--one", engine, work, str(root)]
            runs = sorted(
                (run_measured(command, args.work / "history.log") for _ in range(args.repeats)),
                key=lambda run: run.seconds,
            )
            results[engine] = runs[len(runs) // 2]
        outcomes = {
            engine: {k: v for k, v in run.result.items() if k != "seconds"} for engine, run in results.items()
        }
        reference = next(iter(outcomes.values()))
        for engine, run in results.items():
            same = "same as the first" if outcomes[engine] == reference else f"DIFFERS: {outcomes[engine]}"
            print(f"{work:12} {engine:8} {run.seconds:8.2f} {human_bytes(run.peak_rss):>10}  {same}")
        print(f"{work:12} result: {reference}", flush=True)


if __name__ == "__main__":
    main()
