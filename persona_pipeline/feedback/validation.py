"""Validating a feedback batch: responses to offers that were made. Pure: no Dagster.

Every row either becomes a response or a reject with a reason a person understands;
a bad row never stops the good ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_pipeline.resources.landing_files import FEEDBACK_FIELDS, clip_raw

RESPONSES = ("accepted", "rejected", "used", "dismissed")
UTC_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"
SHOWN_VALUE_CHARS = 40


def offer_ids(rows: pd.DataFrame) -> pd.Series:
    """The offer ids as responses name them, without surrounding blanks."""
    return rows["offer_id"].astype("string").str.strip()


@dataclass
class ValidatedFeedback:
    responses: pd.DataFrame  # batch_id, offer_id, response, responded_at, source_file, source_row
    rejects: pd.DataFrame  # batch_id, source_file, source_row, raw, reason, reason_code
    # Rows that name no offer made (yet) and are right otherwise: the fields as read, as text,
    # plus batch_id, source_file, source_row, raw. They are held, or rejected once held long enough.
    unknown: pd.DataFrame


def validate_feedback(
    rows: pd.DataFrame, offers: pd.DataFrame, now: pd.Timestamp, clock_skew: pd.Timedelta
) -> ValidatedFeedback:
    """Check responses: `rows` has batch_id, FEEDBACK_FIELDS, source_file, source_row, raw;
    `offers` (index offer_id) the offers among those `offer_ids(rows)` name, with `created_at`
    and `offer_day`. A response cannot be later than `now` plus `clock_skew`, nor earlier than
    the offer: its day (event time) or its `created_at`, whichever is earlier."""
    offer = offer_ids(rows)
    response = rows["response"].astype("string").str.strip().str.lower()
    stamp_text = rows["responded_at"].astype("string").str.strip()
    has_offset = stamp_text.str.contains(UTC_OFFSET, regex=True, na=False) & stamp_text.str.contains(
        "T", na=False
    )
    stamps = pd.to_datetime(stamp_text.where(has_offset), utc=True, errors="coerce", format="ISO8601")
    made = offers.reindex(offer.fillna("").to_numpy()).set_axis(rows.index)
    earliest = pd.concat(
        [
            pd.to_datetime(made["offer_day"], utc=True, errors="coerce", format="%Y-%m-%d"),
            pd.to_datetime(made["created_at"], utc=True),
        ],
        axis=1,
    ).min(axis=1)
    latest = now + clock_skew

    # In this order: a row's reason is the first check it fails.
    checks = [
        ("missing_offer_id", offer.isna() | (offer == ""), "offer_id is missing or empty"),
        (
            "unknown_response",
            ~response.isin(RESPONSES),
            "response {response!r} is not one of " + ", ".join(RESPONSES),
        ),
        (
            "bad_timestamp",
            stamps.isna(),
            "responded_at {responded_at!r} is not an ISO-8601 timestamp with a UTC offset",
        ),
        (
            "future_response",
            stamps > latest,
            "responded_at {responded_at!r} is in the future (later than "
            + f"{latest:%Y-%m-%dT%H:%M:%SZ}, now plus {_minutes(clock_skew)} min of clock skew)",
        ),
        ("unknown_offer", earliest.isna(), "offer_id {offer_id!r} names no offer that was made"),
        (
            "before_offer",
            stamps < earliest,
            "responded_at {responded_at!r} is before offer {offer_id!r} was made (day {offer_day})",
        ),
    ]
    code = pd.Series(pd.NA, index=rows.index, dtype="string")
    for name, failed, _ in checks:
        code = code.where(code.notna() | ~failed.fillna(True), name)
    unknown = (code == "unknown_offer").fillna(False).to_numpy()
    bad = code.notna().to_numpy() & ~unknown
    templates = {name: template for name, _, template in checks}
    rejected = rows[bad]
    reasons = [
        templates[c].format(offer_id=_shown(o), response=_shown(r), responded_at=_shown(t), offer_day=d)
        for c, o, r, t, d in zip(
            code[bad],
            rejected["offer_id"],
            rejected["response"],
            rejected["responded_at"],
            made["offer_day"].to_numpy()[bad],
            strict=True,
        )
    ]
    rejects = pd.DataFrame(
        {
            "batch_id": rejected["batch_id"].to_numpy(),
            "source_file": rejected["source_file"].to_numpy(),
            "source_row": rejected["source_row"].to_numpy(),
            "raw": _raw(rejected),
            "reason": reasons,
            "reason_code": code[bad].to_numpy(),
        }
    )
    good = code.isna().to_numpy()
    responses = pd.DataFrame(
        {
            "batch_id": rows.loc[good, "batch_id"].to_numpy(),
            "offer_id": offer[good].to_numpy(),
            "response": response[good].to_numpy(),
            "responded_at": stamps[good].to_numpy(),
            "source_file": rows.loc[good, "source_file"].to_numpy(),
            "source_row": rows.loc[good, "source_row"].to_numpy(),
        }
    )
    # The same response to the same offer twice in a batch is one response: keep the latest.
    responses = responses.sort_values("responded_at").drop_duplicates(
        ["batch_id", "offer_id", "response"], keep="last"
    )
    held = rows[unknown]
    as_text = held[list(FEEDBACK_FIELDS)].astype("string")
    unknown_rows = pd.DataFrame(
        {
            "batch_id": held["batch_id"].to_numpy(),
            "source_file": held["source_file"].to_numpy(),
            "source_row": held["source_row"].to_numpy(),
            **{field: as_text[field].to_numpy(dtype=object) for field in FEEDBACK_FIELDS},
            "raw": _raw(held),
        }
    )
    return ValidatedFeedback(responses.reset_index(drop=True), rejects, unknown_rows)


HELD_KEY = ["batch_id", "source_file", "source_row"]


def settle_unknown(
    unknown: pd.DataFrame, held_before: pd.DataFrame, now: pd.Timestamp, hold: pd.Timedelta
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(held, rejects) of the rows that name no offer made: a row is held from when it was first
    seen (`held_before`, by batch, file and row; else now) until `hold` later; after that it is a
    reject with reason code unknown_offer that says how long it was held."""
    known_since = held_before[[*HELD_KEY, "first_seen_at", "hold_until"]].drop_duplicates(HELD_KEY)
    rows = unknown.merge(known_since, on=HELD_KEY, how="left")
    for column, default in (("first_seen_at", now), ("hold_until", now + hold)):
        rows[column] = pd.to_datetime(rows[column], utc=True).astype("datetime64[us, UTC]").fillna(default)
    expired = (rows["hold_until"] <= now).to_numpy()
    gone = rows[expired]
    held_days = ((now - gone["first_seen_at"]) / pd.Timedelta(days=1)).round(1)
    reasons = [
        f"offer_id {_shown(offer)!r} names no offer that was made"
        + (f" (held {days:g} days)" if days > 0 else "")
        for offer, days in zip(gone["offer_id"].str.strip(), held_days, strict=True)
    ]
    rejects = pd.DataFrame(
        {
            "batch_id": gone["batch_id"].to_numpy(),
            "source_file": gone["source_file"].to_numpy(),
            "source_row": gone["source_row"].to_numpy(),
            "raw": gone["raw"].to_numpy(),
            "reason": reasons,
            "reason_code": "unknown_offer",
        }
    )
    return rows[~expired].reset_index(drop=True), rejects


@dataclass
class LoadedFeedback:
    responses: pd.DataFrame  # of the batch, and held rows of other batches whose offer now exists
    rejects: pd.DataFrame  # of the batch, and held rows of other batches held long enough
    held: pd.DataFrame  # offer_feedback_held rows of every batch tried, still waiting for their offer
    retried_batches: list[str]  # the other batches whose held rows were tried again


def load_feedback(
    rows: pd.DataFrame,
    batch_id: str,
    held_before: pd.DataFrame,
    rejected_before: pd.DataFrame,
    offers_of: Callable[[list[str]], pd.DataFrame],
    now: pd.Timestamp,
    hold: pd.Timedelta,
    clock_skew: pd.Timedelta,
) -> LoadedFeedback:
    """One batch's rows (batch_id, FEEDBACK_FIELDS, source_file, source_row, raw) and the rows
    other batches hold (`held_before`, every held row) checked together against the offers made
    (`offers_of(offer ids)`, as validate_feedback takes them). A row of the batch that was
    rejected for naming no offer before (`rejected_before`: batch_id, source_file, source_row,
    rejected_at) is not held again when the batch is processed again."""
    columns = ["batch_id", *FEEDBACK_FIELDS, "source_file", "source_row", "raw"]
    others = held_before[held_before["batch_id"] != batch_id]
    candidates = pd.concat(
        [rows.reindex(columns=columns), others.reindex(columns=columns)], ignore_index=True
    )
    offers = offers_of(offer_ids(candidates).dropna().unique().tolist())
    validated = validate_feedback(candidates, offers, now, clock_skew)
    history = pd.concat(
        [
            held_before[[*HELD_KEY, "first_seen_at", "hold_until"]],
            rejected_before.assign(first_seen_at=now, hold_until=rejected_before["rejected_at"])[
                [*HELD_KEY, "first_seen_at", "hold_until"]
            ],
        ],
        ignore_index=True,
    )
    held, expired = settle_unknown(validated.unknown, history, now, hold)
    return LoadedFeedback(
        responses=validated.responses,
        rejects=pd.concat([validated.rejects, expired], ignore_index=True),
        held=held,
        retried_batches=sorted(others["batch_id"].unique()),
    )


def _minutes(span: pd.Timedelta) -> str:
    return f"{span / pd.Timedelta(minutes=1):g}"


def _shown(value: object) -> object:
    """A value as quoted in a reason: long text shortened."""
    if isinstance(value, str) and len(value) > SHOWN_VALUE_CHARS:
        return value[:SHOWN_VALUE_CHARS] + "…"
    return value


def _raw(rows: pd.DataFrame) -> np.ndarray:
    """What was read (the fields as JSON) where the reader kept no raw text."""
    if rows.empty:
        return np.array([], dtype=object)
    stored = rows["raw"].astype(object)
    fields = rows[list(FEEDBACK_FIELDS)].astype(object)
    records = fields.where(fields.notna(), None).to_dict("records")
    rebuilt = pd.Series(
        [clip_raw(json.dumps(record, default=str, ensure_ascii=False)) for record in records],
        index=rows.index,
    )
    return stored.where(stored.notna(), rebuilt).to_numpy(dtype=object)
