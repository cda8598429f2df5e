"""Validating a feedback batch: responses to offers that were made. Pure: no Dagster.

Every row either becomes a response or a reject with a reason a person understands;
a bad row never stops the good ones.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from persona_pipeline.ingest.reading import clip_raw

RESPONSES = ("accepted", "rejected", "used", "dismissed")
FEEDBACK_FIELDS = ("offer_id", "response", "responded_at")
UTC_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"
SHOWN_VALUE_CHARS = 40


def offer_ids(rows: pd.DataFrame) -> pd.Series:
    """The offer ids as responses name them, without surrounding blanks."""
    return rows["offer_id"].astype("string").str.strip()


def validate_feedback(
    rows: pd.DataFrame, known_offers: pd.Index, batch_id: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(responses, rejects) of one batch. `rows` has FEEDBACK_FIELDS + source_file, source_row, raw;
    `known_offers` are those of `offer_ids(rows)` that name an offer that was made."""
    offer = offer_ids(rows)
    response = rows["response"].astype("string").str.strip().str.lower()
    stamp_text = rows["responded_at"].astype("string").str.strip()
    has_offset = stamp_text.str.contains(UTC_OFFSET, regex=True, na=False) & stamp_text.str.contains(
        "T", na=False
    )
    stamps = pd.to_datetime(stamp_text.where(has_offset), utc=True, errors="coerce", format="ISO8601")

    checks = [
        ("missing_offer_id", offer.isna() | (offer == ""), "offer_id is missing or empty"),
        ("unknown_offer", ~offer.isin(known_offers), "offer_id {offer_id!r} names no offer that was made"),
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
    ]
    code = pd.Series(pd.NA, index=rows.index, dtype="string")
    for name, failed, _ in checks:
        code = code.where(code.notna() | ~failed.fillna(True), name)
    bad = code.notna()
    templates = {name: template for name, _, template in checks}
    rejected = rows[bad]
    reasons = [
        templates[c].format(offer_id=_shown(o), response=_shown(r), responded_at=_shown(t))
        for c, o, r, t in zip(
            code[bad], rejected["offer_id"], rejected["response"], rejected["responded_at"], strict=True
        )
    ]
    rejects = pd.DataFrame(
        {
            "batch_id": batch_id,
            "source_file": rejected["source_file"].to_numpy(),
            "source_row": rejected["source_row"].to_numpy(),
            "raw": _raw(rejected),
            "reason": reasons,
            "reason_code": code[bad].to_numpy(),
        }
    )
    good = ~bad
    responses = pd.DataFrame(
        {
            "batch_id": batch_id,
            "offer_id": offer[good].to_numpy(),
            "response": response[good].to_numpy(),
            "responded_at": stamps[good].to_numpy(),
            "source_file": rows.loc[good, "source_file"].to_numpy(),
            "source_row": rows.loc[good, "source_row"].to_numpy(),
        }
    )
    # The same response to the same offer twice in a batch is one response: keep the latest.
    responses = responses.sort_values("responded_at").drop_duplicates(["offer_id", "response"], keep="last")
    return responses.reset_index(drop=True), rejects


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
