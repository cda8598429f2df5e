"""`persona-pipeline demo`: the whole loop on the demo fleet, and what the learned weights changed.

The landed days run in rounds. The first run covers all but the last `rounds` days and makes
that day's offers. Then, for each remaining day, the demo's people answer the offers not
answered yet (a feedback batch in the landing zone), and the run for that day processes the
batch, refreshes the weights and makes the day's offers with them.

Acceptance per weights version compares different days and different devices (a fleet's first
offers go to everyone who qualifies, later days only to what changed), so it cannot tell
whether the weights got better. `compare_weights` can: it copies the persona store and the
vector index twice, makes the last day's offers again from the same state in both copies, once
with the initial weights and once with the learned ones, and scores both sets with the
acceptance probability of the demo's response model.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import sqlalchemy as sa

from persona_pipeline import settings
from persona_pipeline.app.home import CommandError
from persona_pipeline.app.runner import ChainResult, NothingToAnswer, run_chain, simulate_feedback
from persona_pipeline.demo.responses import (
    NEEDED_ACCEPTANCE,
    OTHER_ACCEPTANCE,
    RECEPTIVE_ACCEPTANCE,
    RECEPTIVE_MODELS,
    acceptance_probability,
)
from persona_pipeline.partitions import DEVICE_SHARDS, device_shard_keys, outside_partitions
from persona_pipeline.personas.weights import current_weights, insert_weights
from persona_pipeline.resources import LandingZone, PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.service_catalog import TRIGGERS
from persona_pipeline.store.tables import key_weights, service_recommendations

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# Both arms fit their segments anew: with the newest weights the vectors are unchanged, and
# the last fit would otherwise stand in one arm while the other arm fits.
SAME_DAY_AGAIN = {**QUIET, "ops": {"segments": {"config": {"refit": True}}}}


@dataclass
class WeightsComparison:
    day: str
    initial_version: int
    learned_version: int
    table: pd.DataFrame  # trigger; offers and expected acceptance with each weights version
    weight_changes: pd.DataFrame  # key, initial, learned


def run_demo(
    rounds: int, seed: int, say: Callable[[str], None], instance: dg.DagsterInstance | None = None
) -> ChainResult:
    """The landed days in rounds, with a simulated feedback batch before each later day."""
    from persona_pipeline.definitions import build_resources

    landing: LandingZone = build_resources(resolved=True)["landing_zone"]
    days = [day for day in landing.landed_days() if outside_partitions(day) is None]
    if len(days) <= rounds:
        raise CommandError(
            f"the demo needs more than {rounds} landed days inside the partitions; "
            f"{landing.shown}/index_updates has {days}"
        )
    first_end = days[-rounds - 1]
    say(f"round 0: days {days[0]} … {first_end} with the initial weights")
    result = run_chain(days[0], first_end, instance=instance, progress=say)
    batches, failed_checks = list(result.feedback_batches), list(result.failed_checks)
    for number, day in enumerate(days[-rounds:], start=1):
        try:
            say(f"round {number}: " + simulate_feedback(seed + number, batch_id=None))
        except NothingToAnswer:
            say(f"round {number}: every offer has a response already")
        result = run_chain(day, day, instance=instance, progress=say)
        batches += result.feedback_batches
        failed_checks += result.failed_checks
        say(f"round {number}: day {day}, {len(result.feedback_batches)} feedback batch(es) learned from")
    return ChainResult(days[0], days[-1], result.run_ids, batches, result.skipped, failed_checks)


def compare_weights(instance: dg.DagsterInstance | None = None) -> WeightsComparison:
    """The last offer day's offers made again from copies of the current state, with the initial
    weights and with the newest weights, scored by the demo's response model."""
    for variable in ("PERSONA_DB_URL", "QDRANT_URL"):
        if os.environ.get(variable):
            raise CommandError(f"the comparison copies the embedded demo stores; unset {variable}")
    truth_file = settings.ground_truth_dir() / "devices.csv"
    if not truth_file.is_file():
        raise CommandError(f"no ground truth at {truth_file}: the comparison needs the demo fleet")
    from persona_pipeline.definitions import build_resources

    resources = build_resources(resolved=True)
    source: PersonaStore = resources["persona_store"]
    config: PersonaConfig = resources["persona_config"]
    initial = config.feature_schema().initial_weights()
    newest = current_weights(source)
    day = source.read_frame(sa.select(sa.func.max(service_recommendations.c.offer_day).label("day")))["day"][
        0
    ]
    if day is None:
        raise CommandError("no offers yet: run `persona-pipeline run` first")
    versions = source.read_frame(sa.select(key_weights.c.version, key_weights.c.source))
    initial_version = int(versions.loc[versions["source"] == "config", "version"].max())
    truth = pd.read_csv(truth_file)
    catalog = config.service_catalog()

    arms = {}
    with tempfile.TemporaryDirectory(prefix="persona-compare-") as scratch:
        for arm, weights in (("initial", initial), ("learned", None)):
            store, index = copy_stores(Path(scratch) / arm, resources["vector_index"].embedded_engine)
            forget_day(store, day)
            if weights is not None:
                version = int(versions["version"].max()) + 1
                insert_weights(store, version, weights, "config")
            offers = offers_again(store, index, config, resources["landing_zone"], day, instance)
            arms[arm] = offers.assign(probability=acceptance_probability(offers, truth, catalog))

    per_arm = []
    for arm, frame in arms.items():
        by_trigger = frame.groupby("trigger")["probability"].agg(["size", "mean"])
        by_trigger.loc["all"] = [len(frame), frame["probability"].mean()]
        per_arm.append(by_trigger.set_axis([f"offers_{arm}", f"acceptance_{arm}"], axis=1))
    order = [*TRIGGERS, "all"]
    table = pd.concat(per_arm, axis=1).fillna(0)
    table = table.reindex([row for row in order if row in table.index])
    schema = config.feature_schema()
    changes = pd.DataFrame(
        {
            "key": [d.concrete_key or d.weight_key for d in schema.dimensions],
            "initial": schema.dimension_weights(initial),
            "learned": schema.dimension_weights(newest.weights),
        }
    ).drop_duplicates("key")
    return WeightsComparison(
        day=day,
        initial_version=initial_version,
        learned_version=newest.version,
        table=table.rename_axis("trigger").reset_index(),
        weight_changes=changes,
    )


def copy_stores(folder: Path, engine: str) -> tuple[PersonaStore, VectorIndex]:
    folder.mkdir(parents=True)
    database = settings.persona_home() / "persona.db"
    with sqlite3.connect(database) as original, sqlite3.connect(folder / "persona.db") as copy:
        original.backup(copy)  # consistent, write-ahead log included
    shutil.copytree(settings.qdrant_path(), folder / "qdrant")
    return PersonaStore(url=f"sqlite:///{folder / 'persona.db'}"), VectorIndex(
        path=str(folder / "qdrant"), embedded_engine=engine
    )


def forget_day(store: PersonaStore, day: str) -> None:
    """The day's offers, as if they were not made yet (tickets do not steer offers: kept)."""
    with store.begin() as connection:
        connection.execute(
            sa.delete(service_recommendations).where(service_recommendations.c.offer_day == day)
        )


def offers_again(
    store: PersonaStore,
    index: VectorIndex,
    config: PersonaConfig,
    landing: LandingZone,
    day: str,
    instance: dg.DagsterInstance | None,
) -> pd.DataFrame:
    from persona_pipeline.definitions import (
        anomaly_scores,
        device_clusters,
        persona_index,
        persona_vectors,
        segments,
    )
    from persona_pipeline.definitions import (
        service_recommendations as recommendations_asset,
    )

    resources = {
        "persona_store": store,
        "vector_index": index,
        "persona_config": config,
        "landing_zone": landing,
    }
    decisions = [anomaly_scores, recommendations_asset]
    if DEVICE_SHARDS == 1:
        steps = [([persona_vectors, persona_index, segments, device_clusters, *decisions], None)]
    else:  # as the jobs run them: the vectors and each device's segment a run per shard
        steps = [([persona_vectors], key) for key in device_shard_keys()]
        steps += [([persona_index, segments], None)]
        steps += [([device_clusters], key) for key in device_shard_keys()]
        steps += [(decisions, None)]
    with dg.DagsterInstance.ephemeral() if instance is None else nullcontext(instance) as runs:
        for assets, key in steps:
            result = dg.materialize(
                assets,
                resources=resources,
                instance=runs,
                partition_key=key,
                run_config=SAME_DAY_AGAIN if segments in assets else QUIET,
                raise_on_error=False,
            )
            if not result.success:
                where = "a copy of the stores" if key is None else f"shard {key} in a copy of the stores"
                raise CommandError(f"re-making the offers of {day} in {where} failed (run {result.run_id})")
    r = service_recommendations.c
    return store.read_frame(
        sa.select(r.offer_id, r.device_id, r.service_id, r.trigger, r.weights_version).where(
            r.offer_day == day
        )
    )


def comparison_report(comparison: WeightsComparison) -> str:
    table = comparison.table
    lines = [
        f"Learning, measured: the offers of {comparison.day} made again from the same state "
        "(profiles, feedback, offer history),",
        f"once with the initial weights (v{comparison.initial_version}) and once with the learned "
        f"ones (v{comparison.learned_version}); acceptance is the demo's response model's chance",
        f"({NEEDED_ACCEPTANCE:.0%} for an offer meeting a planted need; otherwise {RECEPTIVE_ACCEPTANCE:.0%} "
        f"for owners of {' and '.join(RECEPTIVE_MODELS)}, {OTHER_ACCEPTANCE:.0%} for the rest).",
        "",
        f"  {'trigger':<10} {'initial weights':>26} {'learned weights':>26}",
        f"  {'':<10} {'offers':>12} {'acceptance':>13} {'offers':>12} {'acceptance':>13}",
    ]
    for row in table.itertuples():
        lines.append(
            f"  {row.trigger:<10} {int(row.offers_initial):>12,} {row.acceptance_initial:>13.1%} "
            f"{int(row.offers_learned):>12,} {row.acceptance_learned:>13.1%}"
        )
    changes = comparison.weight_changes.assign(
        change=lambda frame: frame["learned"] - frame["initial"]
    ).sort_values("change", key=abs, ascending=False)
    moved = changes[changes["change"].abs() > 1e-6].head(6)
    if not moved.empty:
        lines += ["", "  weights that moved most:"] + [
            f"    {row.key:<45} {row.initial:.3f} -> {row.learned:.3f}" for row in moved.itertuples()
        ]
    return "\n".join(lines)
