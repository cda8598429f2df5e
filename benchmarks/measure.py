"""Measuring a step in a process of its own: wall time, and the peak RSS of that process and
every process it started (os.wait4 reports both), so each stage's peak is its own. The step is
started through benchmarks/launch.py, so the driver's memory is not counted in it."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.launch` finds the package
PACKAGES = ("pandas", "numpy", "pyarrow", "SQLAlchemy", "dagster", "qdrant-client", "scikit-learn")


@dataclass
class Measured:
    seconds: float  # the child's own timing of the work, else the wall time of the process
    peak_rss: int  # bytes
    result: dict


class StepFailed(RuntimeError):
    pass


def run_measured(command: list[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    """Run `command` (output appended to `log`). A child that writes JSON to the file named by
    BENCH_RESULT reports its own seconds (imports excluded) and what it did."""
    result_file = log.with_suffix(f".{time.monotonic_ns()}.json")
    rss_file = result_file.with_suffix(".rss")
    environment = {**os.environ, **(env or {}), "BENCH_RESULT": str(result_file)}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    launched = [sys.executable, "-m", "benchmarks.launch", str(rss_file), *command]
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.run(launched, stdout=out, stderr=subprocess.STDOUT, env=environment)
        wall = time.perf_counter() - started
    if process.returncode != 0:
        raise StepFailed(f"{' '.join(command[-6:])} exited with {process.returncode}; see {log}")
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    peak = int(rss_file.read_text())
    result_file.unlink(missing_ok=True)
    rss_file.unlink(missing_ok=True)
    return Measured(result.get("seconds", wall), _rss_bytes(peak), result)


def run_inline(work: Callable[[], tuple[float, dict]]) -> Measured:
    """Run `work` in this process (tests): its peak RSS is this process's peak so far."""
    seconds, result = work()
    return Measured(seconds, _rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), result)


def _rss_bytes(maxrss: int) -> int:
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def report(seconds: float, **details) -> None:
    """In a measured child: hand the seconds and details back to `run_measured`."""
    target = os.environ.get("BENCH_RESULT")
    if target:
        Path(target).write_text(json.dumps({"seconds": seconds, **details}, default=str))


def machine_line() -> str:
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    return (
        f"machine: {cores} cores, {memory:.1f} GiB RAM, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; {versions}; load average {load}"
    )


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"
