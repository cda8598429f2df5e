"""`persona-pipeline evaluate anomalies`: how well the anomaly scores find what is planted.

(a) The demo fleet, generated with a fixed seed into a throw-away home and run through
the real assets; scored against its planted failing devices. (b) Labelled public
datasets shipped with scikit-learn, fed through the same scoring functions. Both print
each PyOD detector alone beside the segment signal alone and the combined score.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from persona_pipeline.anomalies.evaluation import (
    PUBLIC_DATASETS,
    evaluate_public,
    flag_quality,
    precision_at_count,
    roc_auc,
)
from persona_pipeline.anomalies.scoring import (
    DETECTORS,
    AnomalySettings,
    combine,
    detector_scores,
    robust_z,
)
from persona_pipeline.segments.clustering import ClusteringSettings

# Settings that would point a throw-away evaluation at real stores; cleared for its run.
STORE_VARIABLES = (
    "PERSONA_DB_URL",
    "PERSONA_LANDING_DIR",
    "PERSONA_SOURCE_DB_URL",
    "QDRANT_URL",
    "QDRANT_API_KEY",
)
DEMO_TARGETS = {"roc_auc": 0.95, "precision_at_planted": 0.8}
FLAG_TARGETS = {"precision": 0.7, "recall": 0.9}  # of the flags, where devices fail
HEALTHY_MAX_FLAGGED = 0.005  # share of a fleet where nothing is broken
PUBLIC_MAX_GAP = 0.02


@dataclass
class DemoEvaluation:
    table: pd.DataFrame  # method, roc_auc, precision_at_planted; the stored score last
    devices: int
    planted: int
    flagged: int
    home: Path
    flag_precision: float = float("nan")
    flag_recall: float = float("nan")


def evaluate_demo_fleet(
    devices: int,
    days: int,
    seed: int,
    home: Path | None = None,
    db_url: str | None = None,
    keep: Callable[[pd.DataFrame], pd.Series] | None = None,
) -> DemoEvaluation:
    """Generate the demo fleet into `home` (a temporary folder by default), run the whole chain
    through Dagster and compare `anomaly_scores` with the planted failing devices. The persona
    store is SQLite in `home` unless `db_url` names another (an empty database). `keep`, given the
    ground truth, says which devices land (e.g. none of the failing ones: a fleet with nothing
    broken)."""
    from persona_pipeline.app.home import init_home
    from persona_pipeline.demo.generator import generate_fleet, write_ground_truth, write_landing

    home = home or Path(tempfile.mkdtemp(prefix="persona-evaluate-"))
    for name in STORE_VARIABLES:
        os.environ.pop(name, None)
    os.environ["PERSONA_HOME"] = str(home)
    if db_url:
        os.environ["PERSONA_DB_URL"] = db_url
    os.environ.pop("DAGSTER_HOME", None)
    init_home()

    start = (date.today() - timedelta(days=days)).isoformat()
    fleet = generate_fleet(devices, days, seed, start)
    if keep is not None:
        kept = set(fleet.devices.loc[keep(fleet.devices).to_numpy(dtype=bool), "device_id"])
        fleet.devices = fleet.devices[fleet.devices["device_id"].isin(kept)]
        fleet.updates = {day: rows[rows["device_id"].isin(kept)] for day, rows in fleet.updates.items()}
    write_landing(fleet, home / "landing")
    write_ground_truth(fleet, home / "ground_truth")

    import dagster as dg

    from persona_pipeline.app.runner import run_chain

    with dg.DagsterInstance.ephemeral() as instance:
        run_chain(None, None, instance=instance)
    return score_demo_home(home, db_url)


def score_demo_home(home: Path, db_url: str | None = None) -> DemoEvaluation:
    """Scores in the persona store under `home` against its ground truth."""
    from persona_pipeline.anomalies.storage import read_scores
    from persona_pipeline.personas.storage import read_stored_vectors
    from persona_pipeline.resources import PersonaStore

    store = PersonaStore(url=db_url or f"sqlite:///{home / 'persona.db'}")
    scores = read_scores(store).set_index("device_id")
    vectors = read_stored_vectors(store)
    truth = pd.read_csv(home / "ground_truth" / "devices.csv").set_index("device_id")
    labels = truth["failing"].reindex(vectors.device_ids).fillna(False).to_numpy(dtype=bool)
    aligned = scores.reindex(vectors.device_ids)

    settings = AnomalySettings(detector=str(aligned["detector"].iloc[0]))
    rows = [
        {
            "method": f"{name} alone",
            **_metrics(labels, robust_z(detector_scores(vectors.matrix, name, settings))),
        }
        for name in DETECTORS
    ]
    rows.append({"method": "segment distance alone", **_metrics(labels, aligned["segment_z"].to_numpy())})
    combined = combine(
        aligned["segment_z"].to_numpy(), aligned["detector_z"].to_numpy(), settings.segment_margin
    )
    rows.append({"method": f"combined z ({settings.detector})", **_metrics(labels, combined)})
    rows.append({"method": "calibrated: anomaly_scores", **_metrics(labels, aligned["score"].to_numpy())})
    flags = flag_quality(labels, aligned["is_anomaly"].to_numpy(dtype=bool))
    return DemoEvaluation(
        table=pd.DataFrame(rows),
        flag_precision=flags["precision"],
        flag_recall=flags["recall"],
        devices=len(labels),
        planted=int(labels.sum()),
        flagged=int(aligned["is_anomaly"].sum()),
        home=home,
    )


def _metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {"roc_auc": roc_auc(labels, scores), "precision_at_planted": precision_at_count(labels, scores)}


def public_table(seeds: int) -> pd.DataFrame:
    """Per dataset and method: ROC-AUC and precision at the planted count (means over seeds),
    plus each method's gap to the best single detector."""
    results = evaluate_public(seeds, ClusteringSettings(), AnomalySettings())
    singles = results[results["method"].isin(DETECTORS)]
    best = singles.groupby("dataset")["roc_auc"].max()
    results["gap_to_best_detector"] = results["roc_auc"] - results["dataset"].map(best)
    return results


def report(
    demo: DemoEvaluation | None, public: pd.DataFrame | None, default_detector: str
) -> tuple[str, bool]:
    """The printed tables and whether every target holds."""
    lines: list[str] = []
    passed = True
    if demo is not None:
        lines += [
            f"(a) demo fleet: {demo.devices:,} devices, {demo.planted} planted failing devices, "
            f"{demo.flagged} flagged by anomaly_scores",
            _text_table(demo.table),
        ]
        combined = demo.table.iloc[-1]
        for metric, target in DEMO_TARGETS.items():
            ok = combined[metric] >= target
            passed &= bool(ok)
            lines.append(f"  target {metric} >= {target}: {combined[metric]:.3f} {'ok' if ok else 'MISSED'}")
        measured = {"precision": demo.flag_precision, "recall": demo.flag_recall}
        for metric, target in FLAG_TARGETS.items():
            ok = measured[metric] >= target
            passed &= bool(ok)
            lines.append(
                f"  target flag {metric} >= {target}: {measured[metric]:.3f} {'ok' if ok else 'MISSED'}"
            )
        lines.append("")
    if public is not None:
        lines.append("(b) public datasets (scikit-learn, ODDS-style; means over seeded draws):")
        for dataset in PUBLIC_DATASETS:
            rows = public[public["dataset"] == dataset.name]
            lines += [f"  {dataset.description}, {int(rows['devices'].iloc[0])} rows", _text_table(rows)]
        ours = public[public["method"] == f"combined:{default_detector}"]
        for _, row in ours.iterrows():
            ok = row["gap_to_best_detector"] >= -PUBLIC_MAX_GAP
            passed &= bool(ok)
            lines.append(
                f"  {row['dataset']}: combined ({default_detector}) {row['roc_auc']:.3f}, "
                f"{row['gap_to_best_detector']:+.3f} vs the best single detector "
                f"(target >= -{PUBLIC_MAX_GAP}): {'ok' if ok else 'MISSED'}"
            )
    return "\n".join(lines), passed


def _text_table(frame: pd.DataFrame) -> str:
    shown = frame.drop(columns=["dataset", "devices", "anomalies"], errors="ignore").copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda value: f"{value:.3f}")
    return "\n".join("    " + line for line in shown.to_string(index=False).splitlines())
