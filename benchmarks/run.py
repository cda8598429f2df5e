"""The benchmark: a generated fleet through every stage, the naive baseline, Dagster's chain.

For each fleet size: generate day 1 (every device, `updates_per_device` updates each) and
day 2 (only `changed_share` of the devices change) as Parquet; then, `repeats` times in a
fresh embedded home, run each stage of day 1 and of day 2 in a process of its own, then a
feedback batch (answering the offers made) and the weights refresh; then the naive baseline
on day 1, and `persona-pipeline run` for day 1 and for day 2 in another fresh home. Prints one
table per size (medians of the repeats) and, for several sizes, how each stage's cost grows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from benchmarks import fleet, naive, stages
from benchmarks.measure import Measured, human_bytes, run_inline, run_measured
from benchmarks.stages import DAY_STAGES, FEEDBACK_BATCH, LEARNING_STAGES, STAGES
from persona_pipeline.offers.recommend import hash_hex
from persona_pipeline.resources import PersonaStore
from persona_pipeline.store.tables import service_recommendations

ROOT = Path(__file__).resolve().parent.parent
CHAIN = "chain"  # the row of `persona-pipeline run`
RESPONSES = np.array(["accepted", "used", "rejected", "dismissed"])


@dataclass
class Options:
    devices: int
    updates_per_device: int = 10
    repeats: int = 1
    index_sample: int | None = None  # None: the index stage writes every device
    changed_share: float = 0.01
    moved_share: float = 0.2  # of the changed devices, those that move city on day 2
    seed: int = 7
    day: str = field(default_factory=lambda: (date.today() - timedelta(days=3)).isoformat())
    work: Path = Path(".bench")
    dagster: bool = True
    stages: bool = True  # False: only the chain through Dagster (and the baseline)
    device_shards: int = 1  # PERSONA_DEVICE_SHARDS of the chain's runs
    baseline: bool = True
    upsert_sample: int = 2_000
    response_share: float = 0.25  # of the offers made, answered in the feedback batch
    # Days of earlier offers (the fleet's daily budget's worth each) stored before the chain's
    # incremental day, as a fleet that has run that long has them.
    offer_history_days: int = 0
    keep: bool = False
    isolate: bool = True  # each stage in a process of its own; False runs them here (tests)

    @property
    def next_day(self) -> str:
        return (date.fromisoformat(self.day) + timedelta(days=1)).isoformat()

    @property
    def folder(self) -> Path:
        return self.work.resolve() / f"devices-{self.devices}"


@dataclass
class Results:
    options: Options
    generated: dict
    full: dict[str, list[Measured]] = field(default_factory=dict)
    incremental: dict[str, list[Measured]] = field(default_factory=dict)
    naive: list[Measured] = field(default_factory=list)
    in_memory: list[Measured] = field(default_factory=list)


def benchmark(options: Options, say=print) -> Results:
    results = Results(options, generate(options))
    say(f"fleet generated: {results.generated['rows']:,} updates in {results.generated['seconds']:.1f} s")
    for repeat in range(1, options.repeats + 1):
        home = fresh_home(options, f"run-{repeat}")
        if options.stages:
            for phase, day in (("full", options.day), ("incremental", options.next_day)):
                for name in DAY_STAGES:
                    _record(results, phase, name, run_stage(options, home, name, day), say)
            write_feedback_batch(home, options)
            for name in LEARNING_STAGES:
                _record(results, "full", name, run_stage(options, home, name, options.next_day), say)
        if options.dagster:
            chain_home = fresh_home(options, f"chain-{repeat}")
            _record(results, "full", CHAIN, run_chain(options, chain_home, options.day), say)
            if options.offer_history_days:
                started = time.perf_counter()
                seeded = store_earlier_offers(chain_home, options)
                say(
                    f"  earlier offers stored: {seeded:,} over {options.offer_history_days} days before "
                    f"{options.day}, in {time.perf_counter() - started:.1f} s"
                )
            _record(results, "incremental", CHAIN, run_chain(options, chain_home, options.next_day), say)
            _cleanup(options, chain_home)
        if options.baseline:
            results.naive.append(run_naive(options, home))
            say(f"  naive baseline: {results.naive[-1].seconds:.1f} s")
            results.in_memory.append(run_stage(options, home, "in_memory", options.day))
            say(f"  in memory, vectorized: {results.in_memory[-1].seconds:.1f} s")
        _cleanup(options, home)
    return results


def _record(results: Results, phase: str, name: str, measured: Measured, say) -> None:
    getattr(results, phase).setdefault(name, []).append(measured)
    label = "whole chain (Dagster)" if name == CHAIN else STAGES[name][0]
    say(f"  {phase:<11} {label:<22} {measured.seconds:8.2f} s  {human_bytes(measured.peak_rss)}")


def generate(options: Options) -> dict:
    """The two days' Parquet files, once per size and seed (kept for later runs)."""
    landing = options.folder / "landing"
    o = options
    marker = (
        o.folder / f"generated-{o.seed}-{o.updates_per_device}-{o.changed_share}-{o.moved_share}-{o.day}.json"
    )
    if marker.exists() and (landing / "index_updates" / f"date={options.day}").is_dir():
        return json.loads(marker.read_text())
    shutil.rmtree(options.folder, ignore_errors=True)
    started = time.perf_counter()
    devices = fleet.make_devices(options.devices, options.seed)
    day1 = fleet.day_updates(devices, options.day, options.updates_per_device, options.seed)
    files = fleet.write_day(day1, landing, options.day)
    changed = fleet.changed_devices(options.devices, options.changed_share, options.seed)
    day2 = fleet.day_updates(
        devices,
        options.next_day,
        options.updates_per_device,
        options.seed,
        rows=changed,
        moved_share=options.moved_share,
    )
    fleet.write_day(day2, landing, options.next_day)
    generated = {
        "rows": len(day1),
        "files": len(files),
        "seconds": time.perf_counter() - started,
        "changed_devices": len(changed),
        "changed_rows": len(day2),
    }
    marker.write_text(json.dumps(generated))
    return generated


def fresh_home(options: Options, name: str) -> Path:
    """A new home whose landing zone shows the generated days (and has its own feedback)."""
    home = options.folder / name
    shutil.rmtree(home, ignore_errors=True)
    (home / "landing").mkdir(parents=True)
    (home / "landing" / "index_updates").symlink_to(options.folder / "landing" / "index_updates")
    return home


def _cleanup(options: Options, home: Path) -> None:
    if not options.keep:
        shutil.rmtree(home, ignore_errors=True)


def _child_env(home: Path, options: Options) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONA_", "QDRANT_", "DAGSTER_"))}
    env.update(
        PERSONA_HOME=str(home),
        PERSONA_PARTITION_START=options.day,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


def run_stage(options: Options, home: Path, name: str, day: str) -> Measured:
    if not options.isolate:
        return run_inline(lambda: _inline_stage(home, name, day, options.index_sample))
    command = [sys.executable, "-m", "benchmarks.stage", name, "--home", str(home), "--day", day]
    if options.index_sample is not None:
        command += ["--index-sample", str(options.index_sample)]
    return run_measured(command, home / "bench.log", _child_env(home, options))


def _inline_stage(home: Path, name: str, day: str, index_sample: int | None) -> tuple[float, dict]:
    seconds, outcome = stages.run_stage(name, home, day, index_sample)
    return seconds, asdict(outcome)


def run_chain(options: Options, home: Path, day: str) -> Measured:
    """`persona-pipeline run` for one day, timed from outside (the command's start included)."""
    command = [str(Path(sys.executable).parent / "persona-pipeline"), "run", "--start", day, "--end", day]
    env = {**_child_env(home, options), "PERSONA_DEVICE_SHARDS": str(options.device_shards)}
    return run_measured(command, home / "bench.log", env)


def run_naive(options: Options, home: Path) -> Measured:
    landing, qdrant = options.folder / "landing", home / "naive-qdrant"
    if not options.isolate:
        return run_inline(lambda: naive.run(landing, options.day, qdrant, options.upsert_sample))
    command = [
        sys.executable,
        "-m",
        "benchmarks.naive",
        "--landing",
        str(landing),
        "--day",
        options.day,
        "--qdrant",
        str(qdrant),
        "--upsert-sample",
        str(options.upsert_sample),
    ]
    return run_measured(command, home / "bench.log", _child_env(home, options))


def store_earlier_offers(home: Path, options: Options, per_device_day: float = 0.3) -> int:
    """`offer_history_days` days of offers before the first day, each day `per_device_day` of
    the fleet's devices drawn at random, each offered a service drawn from the first day's
    offers (with its trigger and segment): what a pipeline that has run that long has stored.
    They are not answered."""
    engine = sa.create_engine(f"sqlite:///{home / 'persona.db'}")
    r = service_recommendations.c
    with engine.connect() as connection:
        made = pd.DataFrame(
            connection.execute(sa.select(r.service_id, r.trigger, r.cluster_id)).all(),
            columns=["service_id", "trigger", "cluster_id"],
        )
    if made.empty:
        engine.dispose()
        return 0
    devices = fleet.make_devices(options.devices, options.seed).ids.to_numpy(zero_copy_only=False)
    rng = np.random.default_rng(options.seed + 1)
    per_day = int(per_device_day * options.devices)
    first = date.fromisoformat(options.day) - timedelta(days=options.offer_history_days)
    stored = 0
    for number in range(options.offer_history_days):
        day = (first + timedelta(days=number)).isoformat()
        offered = made.iloc[rng.integers(0, len(made), per_day)].reset_index(drop=True)
        device_ids = devices[rng.choice(len(devices), size=per_day, replace=False)]
        digits = hash_hex(pd.DataFrame({"d": device_ids, "s": offered["service_id"], "o": day}))
        rows = offered.assign(
            offer_id=("offer-earlier-" + digits).to_numpy(),
            device_id=device_ids,
            score=0.1,
            reason="an earlier offer stored by the benchmark",
            created_at=pd.Timestamp(f"{day}T20:00:00Z"),
            offer_day=day,
            priority=0.5,
            propensity=1.0,
        )
        with engine.begin() as connection:
            PersonaStore.insert_frame(connection, service_recommendations, rows)
        stored += len(rows)
    engine.dispose()
    return stored


def write_feedback_batch(home: Path, options: Options) -> int:
    """Responses to a share of the offers made, as one complete batch: owners of two models
    accept far more often, so the weights refresh has something to learn."""
    engine = sa.create_engine(f"sqlite:///{home / 'persona.db'}")
    with engine.connect() as connection:
        offers = pd.DataFrame(
            connection.execute(
                sa.select(service_recommendations.c.offer_id, service_recommendations.c.device_id)
            ).all(),
            columns=["offer_id", "device_id"],
        )
    engine.dispose()
    rng = np.random.default_rng(options.seed)
    offers = offers[rng.random(len(offers)) < options.response_share].reset_index(drop=True)
    devices = fleet.make_devices(options.devices, options.seed)
    number = offers["device_id"].str.slice(4).astype(np.int64).to_numpy()
    receptive = np.isin(devices.model[number], [0, 2])
    accepted = rng.random(len(offers)) < np.where(receptive, 0.5, 0.1)
    yes, no = RESPONSES[rng.integers(0, 2, len(offers))], RESPONSES[rng.integers(2, 4, len(offers))]
    response = np.where(accepted, yes, no)
    folder = home / "landing" / "offer_feedback" / f"batch={FEEDBACK_BATCH}"
    folder.mkdir(parents=True, exist_ok=True)
    answered_at = f"{options.next_day}T20:00:00Z"
    pd.DataFrame({"offer_id": offers["offer_id"], "response": response, "responded_at": answered_at}).to_json(
        folder / "part-0.jsonl", orient="records", lines=True
    )
    (folder / "_SUCCESS").touch()
    return len(offers)
