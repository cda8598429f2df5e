"""Simulated responses of the demo fleet's people to the offers made. Pure: no Dagster.

The demo's people respond to what they need, as the ground truth says: a device that
moved takes location services for its new city, a heavy user takes offers about its
heavy app, a failing device takes support. A lookalike offer is judged by the need its service
serves. Offers that meet no need are mostly turned down, except by the owners of two
models, who take them at RECEPTIVE_ACCEPTANCE: acceptance depends on a key the initial
weights make little of, so learning has something to find.

That is the "need" response model, the demo's. `persona-pipeline evaluate decisions` also
answers with the others in RESPONSE_MODELS: "latent" (a planted need, or an offer about the
app the person has a latent interest in, which their usage shows only a little), "key" (the
dark-mode setting predicts acceptance and no need does) and "noise" (the same chance for every
offer: nothing any weights could find).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from persona_pipeline.resources.landing_zone import BATCH_PREFIX, FEEDBACK_FOLDER, check_batch_id
from persona_pipeline.service_catalog import ServiceCatalog

NEEDED_ACCEPTANCE = 0.75
# Owners of these models take offers they did not strictly need far more often than others:
# acceptance depends on `device.model`, and not, say, on `device.connection.type`.
RECEPTIVE_MODELS = ("iPhone 15", "Pixel 8")
RECEPTIVE_ACCEPTANCE = 0.4
OTHER_ACCEPTANCE = 0.05
# "key": dark-mode users take any offer at KEY_ACCEPTANCE, the others at OTHER_ACCEPTANCE.
KEY_ACCEPTANCE = 0.5
# "noise": every offer, whoever gets it and whatever it is.
NOISE_ACCEPTANCE = 0.25
RESPONSE_MODELS = {
    "need": "a planted need 75 %, else 40 % for two models' owners and 5 % for the rest",
    "latent": "a planted need or the latent app's offers 75 %, else 5 %",
    "key": "dark-mode users 50 % whatever the offer, others 5 %",
    "noise": "25 % for every offer",
}


def _service_needs(service_ids: pd.Series, catalog: ServiceCatalog) -> pd.DataFrame:
    """Per distinct service id: the need it serves (location/usage/support) and, for usage
    services, the apps it concerns (the app in a templated id, else the catalog's apps)."""
    rows = []
    for service_id in service_ids.unique():
        service = catalog.service_for(service_id)
        trigger = service.trigger if service is not None else None
        apps: tuple[str, ...] = ()
        if trigger == "usage":
            apps = (service_id.split(":", 1)[1],) if ":" in service_id else service.eligibility.apps or ()
        rows.append({"service_id": service_id, "need": trigger, "apps": apps})
    return pd.DataFrame(rows, columns=["service_id", "need", "apps"]).set_index("service_id")


def _about_app(offers: pd.DataFrame, needs: pd.DataFrame, app_of_device: np.ndarray) -> np.ndarray:
    """Whether each offer is a usage service concerning the app given for its device."""
    exploded = pd.DataFrame({"row": np.arange(len(offers)), "app": needs["apps"].to_numpy()}).explode("app")
    about = np.zeros(len(offers), dtype=bool)
    matches = exploded["app"].to_numpy() == app_of_device[exploded["row"].to_numpy()]
    about[exploded["row"].to_numpy()[matches]] = True
    return about & (needs["need"].to_numpy() == "usage")


def needed(offers: pd.DataFrame, truth: pd.DataFrame, catalog: ServiceCatalog) -> np.ndarray:
    """Whether each offer meets a need the ground truth planted: a location service for a device
    that moved, a usage service about the device's heavy app, a support service for a failing
    device. A lookalike offer is judged by the service it offers, like any other."""
    people = truth.set_index("device_id").reindex(offers["device_id"])
    needs = _service_needs(offers["service_id"], catalog).reindex(offers["service_id"])
    need = needs["need"].to_numpy()
    moved = people["moved"].fillna(False).to_numpy(dtype=bool)
    failing = people["failing"].fillna(False).to_numpy(dtype=bool)
    about_heavy_app = _about_app(offers, needs, people["heavy_app"].astype(object).to_numpy())
    return ((need == "location") & moved) | about_heavy_app | ((need == "support") & failing)


def about_latent_interest(offers: pd.DataFrame, truth: pd.DataFrame, catalog: ServiceCatalog) -> np.ndarray:
    """Whether each offer is a usage service about the device's latent app (none planted: False)."""
    if "latent_app" not in truth:
        return np.zeros(len(offers), dtype=bool)
    latent = truth.set_index("device_id")["latent_app"].reindex(offers["device_id"]).astype(object)
    needs = _service_needs(offers["service_id"], catalog).reindex(offers["service_id"])
    return _about_app(offers, needs, latent.to_numpy())


def acceptance_probability(
    offers: pd.DataFrame, truth: pd.DataFrame, catalog: ServiceCatalog, model: str = "need"
) -> np.ndarray:
    """The chance that each offer is accepted under a response model (RESPONSE_MODELS; the
    demo's is "need")."""
    if model not in RESPONSE_MODELS:
        raise ValueError(f"unknown response model {model!r}: one of {', '.join(RESPONSE_MODELS)}")
    people = truth.set_index("device_id")
    if model == "noise":
        return np.full(len(offers), NOISE_ACCEPTANCE)
    if model == "key":
        dark = people["dark_mode"].reindex(offers["device_id"]).astype(str).str.lower() == "true"
        return np.where(dark.to_numpy(), KEY_ACCEPTANCE, OTHER_ACCEPTANCE)
    meets_need = needed(offers, truth, catalog)
    if model == "latent":
        return np.where(
            meets_need | about_latent_interest(offers, truth, catalog), NEEDED_ACCEPTANCE, OTHER_ACCEPTANCE
        )
    device_model = people["model"].reindex(offers["device_id"]).to_numpy()
    unneeded = np.where(np.isin(device_model, RECEPTIVE_MODELS), RECEPTIVE_ACCEPTANCE, OTHER_ACCEPTANCE)
    return np.where(meets_need, NEEDED_ACCEPTANCE, unneeded)


def simulate_responses(
    offers: pd.DataFrame, truth: pd.DataFrame, catalog: ServiceCatalog, seed: int, model: str = "need"
) -> pd.DataFrame:
    """One response per offer: accepted/used with the response model's chance (the demo's: when
    it meets a need, mostly), else rejected/dismissed."""
    rng = np.random.default_rng(seed)
    accepts = rng.random(len(offers)) < acceptance_probability(offers, truth, catalog, model)
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
    """`offer_feedback/batch=<id>/part-0.jsonl`, then `_SUCCESS` (the batch is complete). An id
    that is not a valid batch id (such as `../../x`, which would write outside the landing zone)
    is refused with a ValueError before anything is written."""
    folder = landing / FEEDBACK_FOLDER / f"{BATCH_PREFIX}{check_batch_id(batch_id)}"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in responses.to_dict("records")]
    (folder / "part-0.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (folder / "_SUCCESS").touch()
    return folder
