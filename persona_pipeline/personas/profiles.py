"""Merging updates into profiles: the latest value per (device, key). Pure: no Dagster.

"Latest" is the largest (observed_at, value, customer_id) triple, so the result
does not depend on the order in which partitions arrive, and merging the same rows
twice changes nothing. The store applies the same rule when it upserts.
"""

from __future__ import annotations

import pandas as pd

PROFILE_COLUMNS = ("device_id", "key", "customer_id", "value", "value_number", "observed_at")


def latest_per_device_key(updates: pd.DataFrame) -> pd.DataFrame:
    """One row per (device_id, key): the update with the largest (observed_at, value, customer_id)."""
    if updates.empty:
        return pd.DataFrame(columns=list(PROFILE_COLUMNS))
    ordered = updates.assign(_customer=updates["customer_id"].fillna("")).sort_values(
        ["device_id", "key", "observed_at", "value", "_customer"], kind="stable"
    )
    latest = ordered.drop_duplicates(subset=["device_id", "key"], keep="last")
    return latest[list(PROFILE_COLUMNS)].reset_index(drop=True)


def device_customers(profiles: pd.DataFrame) -> pd.Series:
    """customer_id per device: the one on its most recent update that carries one."""
    known = profiles[profiles["customer_id"].notna()]
    ordered = known.sort_values(["device_id", "observed_at", "customer_id"], kind="stable")
    return ordered.drop_duplicates("device_id", keep="last").set_index("device_id")["customer_id"]


def value_changes(history: pd.DataFrame, since: pd.Timestamp) -> pd.DataFrame:
    """Devices whose value of one key changed after `since` (event time).

    `history` holds (device_id, value, observed_at) rows of one key: every update
    after `since`, plus each device's last update at or before it (the value it
    changed from). Returns device_id, previous_value, value, changed_at for the
    devices whose latest change happened after `since`.
    """
    columns = ["device_id", "previous_value", "value", "changed_at"]
    if history.empty:
        return pd.DataFrame(columns=columns)
    ordered = history.sort_values(["device_id", "observed_at", "value"], kind="stable")
    previous = ordered.groupby("device_id", sort=False)["value"].shift()
    changed = previous.notna() & (previous != ordered["value"]) & (ordered["observed_at"] > since)
    changes = ordered.assign(previous_value=previous)[changed]
    latest = changes.drop_duplicates("device_id", keep="last")
    return latest.rename(columns={"observed_at": "changed_at"})[columns].reset_index(drop=True)
