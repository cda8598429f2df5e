"""Simulated responses of the demo fleet's people to the offers made. Pure: no Dagster.

The demo's people respond to what they need, as the ground truth says: a device that
moved takes location services for its new city, a heavy user takes offers about its
heavy app, a failing device takes support; everything else is mostly turned down.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

NEEDED_ACCEPTANCE = 0.75
OTHER_ACCEPTANCE = 0.08


def needed(offers: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Whether each offer meets a need the ground truth planted."""
    people = truth.set_index("device_id").reindex(offers["device_id"])
    app = offers["service_id"].str.split(":").str[-1].to_numpy()
    moved = people["moved"].fillna(False).to_numpy(dtype=bool)
    heavy_app = people["heavy_app"].astype(object).to_numpy()
    failing = people["failing"].fillna(False).to_numpy(dtype=bool)
    trigger = offers["trigger"].to_numpy()
    return (
        ((trigger == "location") & moved)
        | ((trigger == "usage") & (app == heavy_app))
        | ((trigger == "support") & failing)
        | ((trigger == "lookalike") & (moved | failing))
    )


def simulate_responses(offers: pd.DataFrame, truth: pd.DataFrame, seed: int) -> pd.DataFrame:
    """One response per offer: accepted/used when it meets a need (mostly), else rejected/dismissed."""
    rng = np.random.default_rng(seed)
    wanted = needed(offers, truth)
    accepts = rng.random(len(offers)) < np.where(wanted, NEEDED_ACCEPTANCE, OTHER_ACCEPTANCE)
    positive = np.where(rng.random(len(offers)) < 0.5, "accepted", "used")
    negative = np.where(rng.random(len(offers)) < 0.6, "rejected", "dismissed")
    created = pd.to_datetime(offers["offer_day"]).dt.tz_localize("UTC")
    responded = created + pd.to_timedelta(rng.integers(3_600, 86_400, len(offers)), unit="s")
    return pd.DataFrame(
        {
            "offer_id": offers["offer_id"].to_numpy(),
            "response": np.where(accepts, positive, negative),
            "responded_at": responded.dt.strftime("%Y-%m-%dT%H:%M:%SZ").to_numpy(),
        }
    )


def write_feedback_batch(responses: pd.DataFrame, landing: Path, batch_id: str) -> Path:
    """`offer_feedback/batch=<id>/part-0.jsonl`, then `_SUCCESS` (the batch is complete)."""
    folder = landing / "offer_feedback" / f"batch={batch_id}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in responses.to_dict("records")]
    (folder / "part-0.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (folder / "_SUCCESS").touch()
    return folder
