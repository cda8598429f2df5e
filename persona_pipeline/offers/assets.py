"""Proactive offers: service_recommendations and the support_tickets outbox."""

import dagster as dg
import pandas as pd

from persona_pipeline.anomalies.assets import anomaly_scores
from persona_pipeline.anomalies.storage import read_flagged
from persona_pipeline.automation import AFTER_UPSTREAM
from persona_pipeline.metadata import OWNERS, table_metadata
from persona_pipeline.offers import reporting, storage
from persona_pipeline.offers.lookalikes import lookalike_hits
from persona_pipeline.offers.recommend import (
    APP_KEY_PREFIX,
    WEEK_DAYS,
    OfferInputs,
    app_usage,
    choose_offers,
    offer_candidates,
)
from persona_pipeline.offers.reporting import LIMITS_CHECK
from persona_pipeline.personas import storage as persona_storage
from persona_pipeline.personas.profiles import value_changes
from persona_pipeline.resources import PersonaConfig, PersonaStore, VectorIndex
from persona_pipeline.resources.vector_index import VECTOR_INDEX_POOL
from persona_pipeline.retries import STORE_RETRY
from persona_pipeline.segments.storage import read_assignments
from persona_pipeline.service_catalog import ServiceCatalog
from persona_pipeline.store import tables as store_tables

CITY_KEY = "device.location.city"


def _cooldown_window_start(day: str, catalog: ServiceCatalog) -> str:
    """The first day whose offers still matter: the longest cooldown back (at least the 6 days
    the weekly budget looks back). Older offers neither cool a service down nor keep a
    lookalike from being offered it again."""
    longest = max([s.cooldown_days for s in catalog.spec.services] + [WEEK_DAYS - 1])
    return (pd.Timestamp(day) - pd.Timedelta(days=longest)).strftime("%Y-%m-%d")


def _week_before(day: str) -> str:
    """The first day the contact policy counts with `day`: the daily cap, the weekly budget
    (any 7 days in a row that hold `day`), the capacities and the lookalikes' daily limit. The
    longer cooldowns are read for the day's candidates alone (`storage.read_last_contacts`), so
    what is read each day follows the fleet, not the days of offers kept."""
    return (pd.Timestamp(day) - pd.Timedelta(days=WEEK_DAYS - 1)).strftime("%Y-%m-%d")


@dg.asset(
    owners=OWNERS,
    metadata=table_metadata(store_tables.service_recommendations, store_tables.support_tickets),
    deps=[anomaly_scores],
    automation_condition=AFTER_UPSTREAM,
    group_name="offers",
    kinds={"pandas", "sql", "qdrant"},
    pool=VECTOR_INDEX_POOL,
    retry_policy=STORE_RETRY,
    check_specs=[
        dg.AssetCheckSpec(
            LIMITS_CHECK,
            asset="service_recommendations",
            description="The offers stored for the day keep the contact policy: no device over the daily "
            "cap or over max_offers_per_week in the 7 days ending that day, no service offered twice to "
            "a device on one day.",
        )
    ],
)
def service_recommendations(
    context: dg.AssetExecutionContext,
    persona_store: PersonaStore,
    persona_config: PersonaConfig,
    vector_index: VectorIndex,
) -> dg.MaterializeResult:
    """Offers made before anyone asks: localized services after a move (read from the updates'
    event times), app tutorials and features for heavy use (against the device's usage peers,
    a space that does not move with the key weights), diagnostics for health faults (and a
    support ticket above a severity, updated while the fault persists and resolved when it is
    gone). Each offer has a deterministic id (device, service, day), a score (trigger strength
    x the segment's smoothed acceptance rate), a reason and the probability it was chosen;
    cooldowns (from the last offer or rejection), the daily cap, the weekly budget per device
    and each service's daily capacity apply, best expected value first, a small share of
    device-days exploring. Lookalikes: for each service with enough responses, Qdrant's
    recommendation query (accepting devices positive, rejecting ones negative) finds the nearest
    devices not offered it on an earlier day. Re-running the same day with the same inputs adds
    nothing; with new inputs it adds only within what is left of the day: the daily cap counts
    the offers stored for the device that day, and a service's lookalikes that day are at most
    `lookalike_per_service` over all runs."""
    catalog = persona_config.service_catalog()
    as_of = persona_storage.read_latest_observed_at(persona_store)
    if as_of is None:
        return reporting.no_updates_result()
    day = as_of.strftime("%Y-%m-%d")
    since = pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1 - catalog.rules.location_window_days)
    history = persona_storage.read_key_history(persona_store, CITY_KEY, since.to_pydatetime())
    anomalies = read_flagged(persona_store)
    cooldown_start = _cooldown_window_start(day, catalog)
    inputs = OfferInputs(
        day=day,
        moves=value_changes(history, since),
        app_usage=app_usage(
            persona_storage.read_profiles(
                persona_store, key_prefix=APP_KEY_PREFIX, columns=("device_id", "key", "value_number")
            )
        ),
        segments=read_assignments(persona_store),
        anomalies=anomalies,
        acceptance=storage.read_acceptance(persona_store),
        history=storage.read_offer_history(persona_store, since_day=_week_before(day)),
    )
    lookalikes = lookalike_hits(persona_store, vector_index, day, cooldown_start, catalog)
    candidates = offer_candidates(inputs, catalog, lookalikes)
    contacts = storage.read_last_contacts(persona_store, candidates, day, cooldown_start)
    offers = choose_offers(candidates, inputs, catalog, contacts)
    offered = offers["device_id"].unique().tolist()
    summaries = persona_storage.read_vector_summaries(persona_store, offered).set_index("device_id")
    blobs = persona_storage.read_vector_blobs(persona_store, offered)
    now = pd.Timestamp.now(tz="UTC")
    offers = storage.write_offers(
        persona_store,
        offers.assign(
            created_at=now,
            weights_version=summaries["weights_version"].reindex(offers["device_id"]).to_numpy(),
            space=summaries["space"].reindex(offers["device_id"]).to_numpy(),
            persona_vector=blobs.reindex(offers["device_id"]).to_numpy(),
        ),
        day,
        catalog,
        fleet_devices=len(inputs.segments),
    )
    tickets = storage.write_tickets(persona_store, anomalies, catalog, day, now)
    context.log.info(
        f"{len(offers)} new offers for {day}; support tickets: {len(tickets.opened)} opened, "
        f"{len(tickets.updated)} updated, {len(tickets.resolved)} resolved"
    )
    stored = reporting.window_offers(inputs.history, offers, day)
    open_tickets = storage.tickets_by_status(persona_store).get("open", 0)
    return dg.MaterializeResult(
        check_results=[reporting.contact_policy_check(stored, day, catalog.rules)],
        metadata=reporting.offers_metadata(day, offers, stored, tickets, open_tickets, anomalies),
    )
