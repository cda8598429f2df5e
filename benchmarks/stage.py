"""One stage in a process of its own: `python -m benchmarks.stage NAME --home H --day D`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from benchmarks.measure import report
from benchmarks.stages import STAGES, run_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--day", required=True)
    parser.add_argument("--index-sample", type=int)
    args = parser.parse_args()
    seconds, outcome = run_stage(args.stage, args.home, args.day, args.index_sample)
    report(seconds, **asdict(outcome))


if __name__ == "__main__":
    main()
