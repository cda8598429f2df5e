"""`python -m benchmarks.engines --devices 1000000`: which engine the columnar update history
should use, chosen on measurements.

The same work in each engine, on one day of the benchmark fleet (Parquet files in the landing
zone's layout): read every file of the day, parse `observed_at` (ISO 8601, `Z` or an offset) to
UTC, read `value` as a number where it is one, and keep the latest row per (device_id, key) by
event time. That is the part of read+validate and the profiles merge that a columnar history
would take over (validation's other rules and the database writes are not in it). Each engine
runs in a process of its own, so its peak RSS is its own; every engine's result is checked
against the first one's (rows, devices, the sum of the numeric values, the newest event).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.fleet import day_updates, make_devices, write_day
from benchmarks.measure import Measured, human_bytes, machine_line, report, run_measured

ENGINES = ("pandas", "duckdb", "polars")
DAY = "2026-11-27"


# What validation asks of a row before it can be the latest: a device, a key and an event time
# with its offset (a time without one is rejected, not guessed).
WITH_OFFSET = r"(?:Z|[+-][0-9]{2}:[0-9]{2})$"


def latest_pandas(folder: Path) -> dict:
    import pandas as pd
    import pyarrow.parquet as pq

    frame = pq.read_table(folder).to_pandas()
    frame = frame[(frame["device_id"] != "") & frame["observed_at"].str.contains(WITH_OFFSET, regex=True)]
    frame = frame.assign(
        observed_at=pd.to_datetime(frame["observed_at"], utc=True, format="ISO8601", errors="coerce"),
        value_number=pd.to_numeric(frame["value"], errors="coerce"),
    ).dropna(subset=["device_id", "key", "observed_at"])
    # The latest by event time; of two at the same time, the larger value (any fixed rule would do).
    latest = frame.sort_values(["observed_at", "value"], kind="stable")
    latest = latest.drop_duplicates(["device_id", "key"], keep="last")
    return _summary(
        len(latest),
        latest["device_id"].nunique(),
        float(latest["value_number"].sum()),
        latest["observed_at"].max().isoformat(),
    )


def latest_duckdb(folder: Path) -> dict:
    import duckdb

    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    rows, devices, total, newest = connection.execute(
        f"""
        WITH typed AS (
            SELECT device_id, key, value, TRY_CAST(value AS DOUBLE) AS value_number,
                   TRY_CAST(observed_at AS TIMESTAMPTZ) AS observed_at
            FROM read_parquet('{folder}/*.parquet')
            WHERE device_id <> '' AND regexp_matches(observed_at, '{WITH_OFFSET}')
        ), latest AS (
            -- arg_max skips a NULL argument: wrapped in a struct, a latest value that is not a
            -- number stays the latest.
            SELECT device_id, key,
                   arg_max(struct_pack(v := value_number), (observed_at, value)).v AS value_number,
                   max(observed_at) AS observed_at
            FROM typed
            WHERE device_id IS NOT NULL AND key IS NOT NULL AND observed_at IS NOT NULL
            GROUP BY device_id, key
        )
        SELECT count(*), count(DISTINCT device_id), sum(value_number), max(observed_at) FROM latest
        """
    ).fetchone()
    return _summary(rows, devices, float(total), newest.isoformat())


def latest_polars(folder: Path) -> dict:
    import polars as pl

    observed = pl.col("observed_at").str.replace(r"Z$", "+00:00")
    latest = (
        pl.scan_parquet(folder / "*.parquet")
        .filter((pl.col("device_id") != "") & pl.col("observed_at").str.contains(WITH_OFFSET))
        .with_columns(
            observed.str.to_datetime("%Y-%m-%dT%H:%M:%S%z", strict=False).dt.convert_time_zone("UTC"),
            pl.col("value").cast(pl.Float64, strict=False).alias("value_number"),
        )
        .drop_nulls(["device_id", "key", "observed_at"])
        .group_by("device_id", "key")
        .agg(
            pl.col("value_number").sort_by(["observed_at", "value"]).last(),
            pl.col("observed_at").max(),
        )
        .select(
            pl.len().alias("rows"),
            pl.col("device_id").n_unique().alias("devices"),
            pl.col("value_number").sum().alias("total"),
            pl.col("observed_at").max().alias("newest"),
        )
        .collect()
    )
    row = latest.row(0, named=True)
    return _summary(row["rows"], row["devices"], float(row["total"]), row["newest"].isoformat())


def _summary(rows: int, devices: int, total: float, newest: str) -> dict:
    return {"rows": int(rows), "devices": int(devices), "value_sum": round(total, 3), "newest": newest}


def run_one(engine: str, folder: Path) -> None:
    """In a child process: time one engine and report its result to run_measured."""
    work = {"pandas": latest_pandas, "duckdb": latest_duckdb, "polars": latest_polars}[engine]
    started = time.perf_counter()
    result = work(folder)
    report(time.perf_counter() - started, **result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--updates-per-device", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine; the table shows the median")
    parser.add_argument("--work", type=Path, default=Path(".bench/engines"))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], Path(args.one[1]))
        return

    print(machine_line(), flush=True)
    landing = args.work / f"landing-{args.devices}"
    folder = landing / "index_updates" / f"date={DAY}"
    if not folder.is_dir():
        write_day(day_updates(make_devices(args.devices, 7), DAY, args.updates_per_device, 7), landing, DAY)
    print(f"{args.devices:,} devices x {args.updates_per_device} updates on {DAY}", flush=True)
    results = {}
    for engine in args.engines.split(","):
        runs = [
            run_measured(
                [sys.executable, "-m", "benchmarks.engines", "--one", engine, str(folder)],
                args.work / "engines.log",
            )
            for _ in range(args.repeats)
        ]
        runs.sort(key=lambda run: run.seconds)
        results[engine] = runs[len(runs) // 2]

    def outcome(run: Measured) -> dict:
        return {k: v for k, v in run.result.items() if k != "seconds"}

    reference = outcome(next(iter(results.values())))
    print(f"{'engine':8} {'seconds':>8} {'peak RSS':>10}  rows, devices, value sum, newest event")
    for engine, run in results.items():
        same = "same as the first" if outcome(run) == reference else f"DIFFERS: {outcome(run)}"
        print(f"{engine:8} {run.seconds:8.2f} {human_bytes(run.peak_rss):>10}  {same}")
    print(f"result: {reference}")


if __name__ == "__main__":
    main()
