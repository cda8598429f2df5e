"""`python -m benchmarks --devices 10000 [100000 ...] [--repeats 3]`: see benchmarks/README.md."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from benchmarks.measure import machine_line
from benchmarks.report import growth_table, size_table, targets_table
from benchmarks.run import Options, benchmark

LARGE = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000], help="fleet sizes")
    parser.add_argument("--updates-per-device", type=int, default=10, help="updates per device on day 1")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size; tables show medians")
    parser.add_argument(
        "--large-repeats",
        type=int,
        help="runs per size from 1,000,000 devices on (default: --repeats); a million-device run "
        "takes about half an hour here",
    )
    parser.add_argument(
        "--index-sample",
        type=int,
        default=0,
        help="devices written to the vector index by the index stage, the rest extrapolated "
        "(default 0: every device)",
    )
    parser.add_argument("--changed-share", type=float, default=0.01, help="devices changing on day 2")
    parser.add_argument(
        "--moved-share",
        type=float,
        default=0.2,
        help="of the devices changing on day 2, those that move city",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--day", help="day 1, YYYY-MM-DD (default: three days ago)")
    parser.add_argument("--work", type=Path, default=Path(".bench"), help="data and homes (default .bench)")
    parser.add_argument("--no-dagster", action="store_true", help="skip `persona-pipeline run`")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--no-stages", action="store_true", help="skip the stages one by one: only the chain (and baseline)"
    )
    parser.add_argument(
        "--device-shards", type=int, default=1, help="PERSONA_DEVICE_SHARDS of the chain's runs (default 1)"
    )
    parser.add_argument(
        "--upsert-sample", type=int, default=2_000, help="naive upserts timed, the rest extrapolated"
    )
    parser.add_argument(
        "--offer-history-days",
        type=int,
        default=0,
        help="days of earlier offers (0.3 per device a day) stored before the chain's incremental day, "
        "as a fleet that has run that long has them (default 0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the homes (stores) after the run")
    args = parser.parse_args()

    print(machine_line(), flush=True)
    all_results = []
    for devices in args.devices:
        options = Options(
            devices=devices,
            updates_per_device=args.updates_per_device,
            repeats=args.large_repeats if devices >= LARGE and args.large_repeats else args.repeats,
            index_sample=args.index_sample or None,
            changed_share=args.changed_share,
            moved_share=args.moved_share,
            seed=args.seed,
            work=args.work,
            dagster=not args.no_dagster,
            stages=not args.no_stages,
            device_shards=args.device_shards,
            baseline=not args.no_baseline,
            upsert_sample=args.upsert_sample,
            keep=args.keep,
            offer_history_days=args.offer_history_days,
        )
        if args.day:
            options.day = args.day
        results = benchmark(options, say=lambda line: print(line, flush=True))
        all_results.append(results)
        print()
        print(size_table(results))
        print(flush=True)
        (options.folder / "results.json").write_text(json.dumps(_as_json(results), indent=1, default=str))
    if len(all_results) > 1:
        print(growth_table(all_results))
    print(targets_table(all_results))
    print(machine_line())


def _as_json(results) -> dict:
    return {
        "options": asdict(results.options),
        "generated": results.generated,
        "full": {k: [asdict(m) for m in v] for k, v in results.full.items()},
        "incremental": {k: [asdict(m) for m in v] for k, v in results.incremental.items()},
        "naive": [asdict(m) for m in results.naive],
    }


if __name__ == "__main__":
    main()
