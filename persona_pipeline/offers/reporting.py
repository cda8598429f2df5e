"""The metadata and check results service_recommendations shows in the UI."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from persona_pipeline.metadata import counts_table, markdown_table
from persona_pipeline.offers.recommend import TicketChanges, contact_limit_breaches, emerging_needs
from persona_pipeline.service_catalog import OfferRules

LIMITS_CHECK = "offers_within_contact_policy"


def no_updates_result() -> dg.MaterializeResult:
    """What a run before any update landed reports: no offers, nothing to check."""
    return dg.MaterializeResult(
        metadata={"offers_new": dg.MetadataValue.int(0)},
        check_results=[
            dg.AssetCheckResult(check_name=LIMITS_CHECK, passed=True, description="no updates yet")
        ],
    )


def window_offers(history: pd.DataFrame, new_offers: pd.DataFrame, day: str) -> pd.DataFrame:
    """The offers stored in the history's window once `new_offers` are in: device_id, service_id,
    trigger, offer_day."""
    return pd.concat([history, new_offers.assign(offer_day=day)])[
        ["device_id", "service_id", "trigger", "offer_day"]
    ]


def contact_policy_check(stored: pd.DataFrame, day: str, rules: OfferRules) -> dg.AssetCheckResult:
    """Warns when the offers stored (`window_offers`) break the daily cap, the weekly budget or
    offer a service twice to a device on `day`."""
    breaches = contact_limit_breaches(stored, day, rules.daily_cap, rules.max_offers_per_week)
    return dg.AssetCheckResult(
        check_name=LIMITS_CHECK,
        passed=not any(breaches.values()),
        severity=dg.AssetCheckSeverity.WARN,
        metadata=breaches,
    )


def offers_metadata(
    day: str,
    new_offers: pd.DataFrame,
    stored: pd.DataFrame,
    tickets: TicketChanges,
    open_tickets: int,
    anomalies: pd.DataFrame,
) -> dict[str, dg.MetadataValue]:
    """The day's offers (new in this run and all stored for the day, from `stored`), the support
    tickets changed and open, the needs flagged outside support, and a preview of the best offers."""
    todays = stored[stored["offer_day"] == day]
    preview = (
        new_offers.sort_values("score", ascending=False)
        .groupby("trigger")
        .head(3)[["device_id", "service_id", "trigger", "score", "reason"]]
    )
    return {
        "offer_day": dg.MetadataValue.text(day),
        "offers_new": dg.MetadataValue.int(len(new_offers)),
        "offers_today": dg.MetadataValue.int(len(todays)),
        "devices_offered_today": dg.MetadataValue.int(int(todays["device_id"].nunique())),
        "tickets_opened": dg.MetadataValue.int(len(tickets.opened)),
        "tickets_updated": dg.MetadataValue.int(len(tickets.updated)),
        "tickets_resolved": dg.MetadataValue.int(len(tickets.resolved)),
        "tickets_open": dg.MetadataValue.int(open_tickets),
        "offers_explored": dg.MetadataValue.int(int(new_offers["explored"].sum()) if len(new_offers) else 0),
        "emerging_needs": counts_table(emerging_needs(anomalies), "kind", "flags (not for support)"),
        "offers_by_trigger": counts_table(todays["trigger"].value_counts(), "trigger", "offers"),
        "offers_by_service": counts_table(todays["service_id"].value_counts(), "service", "offers"),
        "preview": markdown_table(
            preview.assign(score=preview["score"].round(3)), max_rows=12, max_cell_chars=300
        ),
    }
