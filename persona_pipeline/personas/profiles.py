"""Merging updates into profiles: the latest value per (device, key). Pure: no Dagster.

"Latest" is the largest (observed_at, value, customer_id) triple, so the result
does not depend on the order in which partitions arrive, and merging the same rows
twice changes nothing. The store applies the same rule when it upserts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROFILE_COLUMNS = ("device_id", "key", "customer_id", "value", "value_number", "observed_at")


def latest_per_device_key(updates: pd.DataFrame) -> pd.DataFrame:
    """One row per (device_id, key): the update with the largest (observed_at, value, customer_id).

    Rows come out ordered by (device_id, key). The order is found on integer codes of the
    columns, and only the winning rows are copied (a day of updates is millions of rows)."""
    if updates.empty:
        return pd.DataFrame(columns=list(PROFILE_COLUMNS))
    device, key = _sorted_codes(updates["device_id"]), _sorted_codes(updates["key"])
    ranks = [
        _sorted_codes(updates["customer_id"].fillna("")),
        _sorted_codes(updates["value"]),
        _sorted_codes(updates["observed_at"]),
        key,
        device,
    ]
    order = np.lexsort(ranks)  # stable; the last array is the primary key
    ordered_device, ordered_key = device[order], key[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (ordered_device[1:] != ordered_device[:-1]) | (ordered_key[1:] != ordered_key[:-1])
    return updates[list(PROFILE_COLUMNS)].take(order[last]).reset_index(drop=True)


def _sorted_codes(values: pd.Series) -> np.ndarray:
    """Integer codes that sort as the values do."""
    return pd.factorize(values, sort=True)[0]


def device_customers(profiles: pd.DataFrame) -> pd.Series:
    """customer_id per device: the one on its most recent update that carries one."""
    known = profiles.loc[profiles["customer_id"].notna(), ["device_id", "observed_at", "customer_id"]]
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


def values_not_merged(latest: pd.DataFrame, stored: pd.DataFrame) -> int:
    """How many (device, key) values of `latest` the stored profile rows (`stored`: those of the
    same devices) lack or hold an older value of: 0 after a correct merge, whatever the order."""
    if latest.empty:
        return 0
    merged = latest[["device_id", "key", "observed_at"]].merge(
        stored[["device_id", "key", "observed_at"]],
        on=["device_id", "key"],
        how="left",
        suffixes=("", "_stored"),
    )
    kept = merged["observed_at_stored"].notna() & (merged["observed_at_stored"] >= merged["observed_at"])
    return int((~kept).sum())
