"""Validating raw index updates against the contract and the feature schema. Pure: no Dagster.

Every row ends up either accepted (normalized: UTC time, canonical value text,
parsed number) or rejected with the first reason that applies. Vectorized: the
checks run on whole columns, and what depends only on a key or a value (the key's
shape and type, the value's number) on its distinct values; a reason's text is
written only for the rows it rejects.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from persona_pipeline.device_shards import DeviceShard
from persona_pipeline.feature_schema import FeatureSchema
from persona_pipeline.resources.landing_files import FIELDS, REJECT_COLUMNS, clip_raw, joined_frames

ACCEPTED_COLUMNS = (
    "partition_date",
    "device_id",
    "customer_id",
    "key",
    "value",
    "value_number",
    "observed_at",
    "source_file",
    "source_row",
)
DOTTED_KEY = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$"
# A time of day followed by an offset: a bare date ("2026-01-05") ends in digits that
# would otherwise pass for an offset.
UTC_OFFSET = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
TRUE_WORDS = {"true", "1", "yes", "y", "t", "1.0", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "f", "0.0", "off"}
SHOWN_VALUE_CHARS = 40
# Characters an id may not hold (RE2 classes): control (Cc), format (Cf: zero-width spaces and
# joiners, direction overrides), private-use (Co) and unassigned-looking surrogates (Cs), line
# and paragraph separators (Zl, Zp), and every space but the ASCII one (no-break spaces look
# like it). An id holding one looks like another id that an erasure of the visible id misses.
INVISIBLE_IN_IDS = (
    r"[\p{Cc}\p{Cf}\p{Co}\p{Cs}\p{Zl}\p{Zp}"
    r"\x{00A0}\x{1680}\x{2000}-\x{200A}\x{202F}\x{205F}\x{3000}]"
)
CATEGORY_NAMES = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Co": "a private-use character",
    "Cs": "a surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Zs": "a space other than ' '",
}
DEFAULT_MAX_LATE_DAYS = 7.0


@dataclass
class ValidationResult:
    accepted: pd.DataFrame
    rejects: pd.DataFrame
    duplicates_dropped: int
    unknown_key_rows: int
    unknown_keys: list[str]
    late_rows: int


def _text(series: pd.Series) -> pd.Series:
    """Values as stripped text; missing, NaN and blank become <NA>.

    A float column (JSON Lines whose values are all numbers) is written without a
    trailing '.0', so 14 reads the same from every file format.
    """
    if pd.api.types.is_float_dtype(series.dtype):
        return _canonical_numbers(series).mask(series.isna())
    text = series.astype("string").str.strip()
    return text.mask(text == "")


def _shown(text: pd.Series) -> pd.Series:
    """A value as quoted in a reason, shortened."""
    short = text.fillna("").str.slice(0, SHOWN_VALUE_CHARS)
    return "'" + short + np.where(text.fillna("").str.len() > SHOWN_VALUE_CHARS, "…'", "'")


def _canonical_numbers(numbers: pd.Series) -> pd.Series:
    """Numbers as text: integral values without a trailing '.0' (each distinct number written once)."""
    codes, distinct = pd.factorize(numbers.to_numpy(dtype=np.float64, na_value=np.nan))
    integral = np.isfinite(distinct) & (distinct == np.round(distinct)) & (np.abs(distinct) < 1e15)
    as_int = np.where(integral, distinct, 0).astype(np.int64).astype(str)
    text = np.append(np.where(integral, as_int, distinct.astype(str)), "nan")  # code -1: NaN
    return pd.Series(text[codes], index=numbers.index, dtype="string")


def _per_distinct(values: pd.Series, function) -> pd.Series:
    """`function` of each distinct value of `values`, spread back over the rows (<NA> stays <NA>):
    keys and values repeat, so this is far less work than calling it on every row."""
    codes, distinct = pd.factorize(values)
    if len(distinct) == 0:
        return pd.Series(np.nan, index=values.index, dtype=object)
    result = function(pd.Series(distinct, dtype=values.dtype)).to_numpy()
    return pd.Series(result[np.maximum(codes, 0)], index=values.index).where(codes >= 0)


def _normalized_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Ids in Unicode NFC (a decomposed é is the composed é), and per row the reason an id holds
    a character no id may hold (<NA> when it holds none). Worked out per distinct id with Arrow."""
    codes, distinct = pd.factorize(ids)
    no_reason = pd.Series(pd.NA, index=ids.index, dtype="string")
    if len(distinct) == 0:
        return ids, no_reason
    try:
        column = pa.array(np.asarray(distinct, dtype=object), type=pa.large_string())
    except (pa.ArrowException, UnicodeEncodeError):  # a lone surrogate: not UTF-8 at all
        column = None
    spread = ids  # unchanged unless NFC changes an id: most fleets' ids are ASCII
    if column is None:
        invisible = np.array([_first_invisible(text) is not None for text in distinct], dtype=bool)
    else:
        invisible = pc.match_substring_regex(column, INVISIBLE_IN_IDS).to_numpy(zero_copy_only=False)
        if not pc.all(pc.string_is_ascii(column)).as_py():
            normalized = pc.utf8_normalize(column, "NFC")
            if not pc.all(pc.equal(normalized, column)).as_py():
                per_row = normalized.to_numpy(zero_copy_only=False)[np.maximum(codes, 0)]
                spread = pd.Series(per_row, index=ids.index, dtype="string").where(codes >= 0)
    if not invisible.any():
        return spread, no_reason
    reasons = np.full(len(distinct), None, dtype=object)
    reasons[invisible] = [_invisible_reason(text) for text in np.asarray(distinct, dtype=object)[invisible]]
    reason = pd.Series(reasons[np.maximum(codes, 0)], index=ids.index, dtype="string").where(codes >= 0)
    return spread, reason


def rows_of_shard(raw: pd.DataFrame, shard: DeviceShard) -> pd.DataFrame:
    """The rows `shard` holds, by their device id as validation accepts it (stripped, NFC); a row
    without one belongs to the shard of the empty id, so every row is in exactly one shard."""
    ids, _ = _normalized_ids(_text(raw["device_id"]))
    held = shard.holds(ids.fillna(""))
    return raw if held.all() else raw[held]


def _first_invisible(text: str) -> str | None:
    return next((c for c in text if c != " " and unicodedata.category(c) in CATEGORY_NAMES), None)


def _invisible_reason(text: str) -> str:
    """`holds U+200B (a format character) in 'd\\u200b1'`: the id shown escaped."""
    character = _first_invisible(text) or "?"
    category = CATEGORY_NAMES.get(unicodedata.category(character), "an invisible character")
    shown = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    if len(shown) > SHOWN_VALUE_CHARS:
        shown = shown[:SHOWN_VALUE_CHARS] + "…"
    return f"holds U+{ord(character):04X} ({category}) in '{shown}'"


def _mask(failed: pd.Series | np.ndarray) -> np.ndarray:
    """A check's result as a NumPy mask; a check that could not be made (<NA>) did not fail."""
    if isinstance(failed, pd.Series):
        return failed.fillna(False).to_numpy(dtype=bool)
    return np.asarray(failed, dtype=bool)


class _Reasons:
    """The first failing check per row wins."""

    def __init__(self, index: pd.Index) -> None:
        self.index = index
        self.open = np.ones(len(index), dtype=bool)  # no reason yet
        self.reason = pd.Series(pd.NA, index=index, dtype="string")
        self.code = pd.Series(pd.NA, index=index, dtype="string")

    def add(
        self,
        code: str,
        failed: pd.Series | np.ndarray,
        message: str | Callable[[pd.Series], pd.Series],
    ) -> None:
        """`message`: the reason, or a function writing it for the rows selected by a mask."""
        target = _mask(failed) & self.open
        if not target.any():
            return
        self.open &= ~target
        rows = pd.Series(target, index=self.index)
        self.code[rows] = code
        if callable(message):
            self.reason[rows] = message(rows).astype("string")
        else:
            self.reason[rows] = message

    @property
    def ok(self) -> pd.Series:
        return pd.Series(self.open, index=self.index)


def _matches(text: pd.Series, pattern: str) -> np.ndarray:
    """Rows whose text matches `pattern` (<NA>: no), with Arrow's RE2 on the whole column: pandas'
    str.contains took 12x longer here. RE2's \\d and \\s are ASCII (re's take any Unicode digit or
    space); a timestamp with other digits is refused as unparsable before its offset is looked at."""
    column = pa.array(text.array, type=pa.large_string(), from_pandas=True)
    return pc.fill_null(pc.match_substring_regex(column, pattern), False).to_numpy(zero_copy_only=False)


def validate_updates(
    raw: pd.DataFrame,
    schema: FeatureSchema,
    partition_date: str,
    day_start: pd.Timestamp,
    day_end: pd.Timestamp,
    max_late_days: float = DEFAULT_MAX_LATE_DAYS,
) -> ValidationResult:
    """Split raw rows of one partition day into accepted and rejected rows."""
    checked = check_updates(raw, schema, partition_date, day_start, day_end, max_late_days)
    return finish_validation([checked], day_start)


@dataclass
class CheckedRows:
    accepted: pd.DataFrame  # ACCEPTED_COLUMNS and KNOWN_KEY, duplicates not dropped yet
    rejects: pd.DataFrame


KNOWN_KEY = "_known_key"  # whether the feature schema knows the row's key
# Rows checked at a time: the checks' intermediate columns take several times the rows' memory.
CHECK_CHUNK_ROWS = 1_000_000


def check_updates(
    raw: pd.DataFrame,
    schema: FeatureSchema,
    partition_date: str,
    day_start: pd.Timestamp,
    day_end: pd.Timestamp,
    max_late_days: float = DEFAULT_MAX_LATE_DAYS,
) -> CheckedRows:
    """Every check of `validate_updates` but the day-wide one (duplicates), chunk by chunk of rows.
    A day read file by file is checked file by file; `finish_validation` puts the files together.
    A row observed more than `max_late_days` before the day is rejected (too_late)."""
    raw = raw.reset_index(drop=True)
    late = max_late_days
    chunks = [
        _check_chunk(
            raw.iloc[start : start + CHECK_CHUNK_ROWS], schema, partition_date, day_start, day_end, late
        )
        for start in range(0, max(len(raw), 1), CHECK_CHUNK_ROWS)
    ]
    if len(chunks) == 1:
        return chunks[0]
    return CheckedRows(pd.concat([c.accepted for c in chunks]), joined_frames([c.rejects for c in chunks]))


def finish_validation(parts: list[CheckedRows], day_start: pd.Timestamp) -> ValidationResult:
    """The checked rows of one day (in the order read) with exact duplicates dropped."""
    accepted = joined_frames([p.accepted for p in parts])
    duplicated = _exact_duplicates(accepted, ["device_id", "customer_id", "key", "value", "observed_at"])
    accepted = _without_rows(accepted, duplicated)
    unknown = accepted["key"][~accepted[KNOWN_KEY]]
    return ValidationResult(
        accepted=accepted[list(ACCEPTED_COLUMNS)].reset_index(drop=True),
        rejects=joined_frames([p.rejects for p in parts]),
        duplicates_dropped=int(duplicated.sum()),
        unknown_key_rows=len(unknown),
        unknown_keys=sorted(unknown.unique().tolist()),
        late_rows=int((accepted["observed_at"] < day_start).sum()),
    )


def _exact_duplicates(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Rows equal to an earlier row in `columns`. Only rows whose hash of those columns repeats
    are compared whole: comparing all of a 10M-row day took four times the memory."""
    hashes = pd.util.hash_pandas_object(frame[columns], index=False)
    repeated = hashes.duplicated(keep=False).to_numpy()
    duplicated = np.zeros(len(frame), dtype=bool)
    duplicated[repeated] = frame.loc[repeated, columns].duplicated(keep="first").to_numpy()
    return duplicated


# Up to this many rows are dropped from a day by slicing around them; more by a filtered copy.
FEW_ROWS = 1_000


def _without_rows(frame: pd.DataFrame, drop: np.ndarray) -> pd.DataFrame:
    """`frame` without the rows `drop` marks. A few go by joining the slices between them: the
    text columns are Arrow arrays, whose slices share the day's buffers, so a 10M-row day with a
    handful of duplicates is not copied whole."""
    dropped = np.flatnonzero(drop)
    if len(dropped) == 0:
        return frame
    if len(dropped) > FEW_ROWS:
        return frame[~drop]
    starts, ends = np.r_[0, dropped + 1], np.r_[dropped, len(frame)]
    pieces = [frame.iloc[start:end] for start, end in zip(starts, ends, strict=True) if end > start]
    return pd.concat(pieces) if pieces else frame.iloc[0:0]


def _check_chunk(
    raw: pd.DataFrame,
    schema: FeatureSchema,
    partition_date: str,
    day_start: pd.Timestamp,
    day_end: pd.Timestamp,
    max_late_days: float,
) -> CheckedRows:
    limits = schema.limits
    reasons = _Reasons(raw.index)

    device_id, device_id_invisible = _normalized_ids(_text(raw["device_id"]))
    customer_id, customer_id_invisible = _normalized_ids(_text(raw["customer_id"]))
    key, key_invisible = _normalized_ids(_text(raw["key"]))
    value = _text(raw["value"])
    observed_text = _text(raw["observed_at"])

    reasons.add("missing_device_id", device_id.isna(), "device_id is missing or empty")
    for name, invisible in (
        ("device_id", device_id_invisible),
        ("customer_id", customer_id_invisible),
        ("key", key_invisible),
    ):
        reasons.add(
            "invisible_character",
            invisible.notna(),
            lambda rows, name=name, invisible=invisible: name + " " + invisible[rows],
        )
    reasons.add(
        "too_long",
        device_id.str.len() > limits.max_device_id_length,
        lambda rows: (
            "device_id is "
            + device_id[rows].str.len().astype("string")
            + f" characters long (limit {limits.max_device_id_length})"
        ),
    )
    reasons.add(
        "too_long",
        customer_id.str.len() > limits.max_device_id_length,
        lambda rows: (
            "customer_id is "
            + customer_id[rows].str.len().astype("string")
            + f" characters long (limit {limits.max_device_id_length})"
        ),
    )
    reasons.add("missing_key", key.isna(), "key is missing or empty")
    reasons.add(
        "too_long",
        key.str.len() > limits.max_key_length,
        lambda rows: (
            "key is "
            + key[rows].str.len().astype("string")
            + f" characters long (limit {limits.max_key_length})"
        ),
    )
    reasons.add(
        "bad_key",
        ~_per_distinct(key, lambda keys: keys.str.match(DOTTED_KEY)).fillna(False).astype(bool),
        lambda rows: "key " + _shown(key[rows]) + " is not a dotted key like device.location.city",
    )
    reasons.add("missing_value", value.isna(), "value is missing")
    reasons.add(
        "too_long",
        value.str.len() > limits.max_value_length,
        lambda rows: (
            "value is "
            + value[rows].str.len().astype("string")
            + f" characters long (limit {limits.max_value_length})"
        ),
    )

    # What depends only on the value (its number, its lowercase), worked out per distinct value.
    value_codes, distinct_values = pd.factorize(value)
    distinct_text = pd.Series(distinct_values, dtype="string")
    distinct_numbers = pd.to_numeric(distinct_text, errors="coerce").astype("Float64")
    number = pd.Series(distinct_numbers.array.take(value_codes, allow_fill=True), index=value.index)
    reasons.add(
        "not_finite",
        value.notna() & number.notna() & ~np.isfinite(number.fillna(0).to_numpy(dtype=float)),
        lambda rows: "value " + _shown(value[rows]) + " is not a finite number",
    )

    reasons.add("missing_observed_at", observed_text.isna(), "observed_at is missing")
    # Microseconds: what every store keeps, so a merge compares the same instants.
    observed_at = pd.to_datetime(observed_text, utc=True, format="ISO8601", errors="coerce").dt.floor("us")
    reasons.add(
        "bad_timestamp",
        observed_at.isna(),
        lambda rows: "observed_at " + _shown(observed_text[rows]) + " is not an ISO-8601 timestamp",
    )
    has_offset = _matches(observed_text, UTC_OFFSET)
    reasons.add(
        "no_utc_offset",
        ~has_offset,
        lambda rows: (
            "observed_at "
            + _shown(observed_text[rows])
            + " has no UTC offset (ISO-8601 with offset required)"
        ),
    )
    latest_allowed = day_end + pd.Timedelta(hours=limits.max_future_skew_hours)
    skew = limits.max_future_skew_hours
    too_late = f" is later than partition {partition_date} allows (day end + {skew:g} h)"
    reasons.add(
        "future_timestamp",
        observed_at > latest_allowed,
        lambda rows: "observed_at " + _shown(observed_text[rows]) + too_late,
    )
    too_early = f" is more than {max_late_days:g} days before partition {partition_date} (max_late_days)"
    reasons.add(
        "too_late",
        observed_at < day_start - pd.Timedelta(days=max_late_days),
        lambda rows: "observed_at " + _shown(observed_text[rows]) + too_early,
    )

    key_codes, distinct_keys = pd.factorize(key)
    types = schema.key_types(list(distinct_keys))
    key_type = _spread(key_codes, np.array([types[k] for k in distinct_keys], dtype=object), None)
    is_numeric = key_type == "numeric"
    is_boolean = key_type == "boolean"
    reasons.add(
        "not_a_number",
        is_numeric & number.isna(),
        lambda rows: (
            "value " + _shown(value[rows]) + " is not a number (" + key[rows].fillna("") + " is numeric)"
        ),
    )
    lowered = distinct_text.str.lower()
    boolean_true = _spread(value_codes, lowered.isin(TRUE_WORDS).to_numpy(dtype=bool), False)
    boolean_false = _spread(value_codes, lowered.isin(FALSE_WORDS).to_numpy(dtype=bool), False)
    reasons.add(
        "not_a_boolean",
        is_boolean & ~(boolean_true | boolean_false),
        lambda rows: (
            "value "
            + _shown(value[rows])
            + " is not a boolean ("
            + key[rows].fillna("")
            + " is boolean: true/false)"
        ),
    )

    ok = reasons.ok
    canonical = _canonical_values(
        value, value_codes, distinct_text, distinct_numbers, lowered.isin(TRUE_WORDS), is_numeric, is_boolean
    )
    accepted = pd.DataFrame(
        {
            "partition_date": partition_date,
            "device_id": device_id,
            "customer_id": customer_id,
            "key": key,
            "value": canonical,
            "value_number": number.where(is_numeric).astype("float64"),
            "observed_at": observed_at,
            "source_file": raw["source_file"],
            "source_row": raw["source_row"],
            KNOWN_KEY: pd.notna(key_type),
        }
    )[ok]
    return CheckedRows(accepted, _reject_rows(raw[~ok], reasons.reason[~ok], reasons.code[~ok]))


def _spread(codes: np.ndarray, per_distinct: np.ndarray, missing) -> np.ndarray:
    """A value per distinct value (factorize's order) spread over the rows; code -1 gets `missing`."""
    if len(per_distinct) == 0:
        return np.full(len(codes), missing, dtype=per_distinct.dtype)
    return np.where(codes >= 0, per_distinct[np.maximum(codes, 0)], missing)


def _canonical_values(
    value: pd.Series,
    codes: np.ndarray,
    text: pd.Series,
    numbers: pd.Series,
    true_word: pd.Series,
    is_numeric: np.ndarray,
    is_boolean: np.ndarray,
) -> pd.Series:
    """Each value as stored: numbers of numeric keys without a trailing '.0', booleans of boolean
    keys as true/false, the rest as given. `text`, `numbers` and `true_word` are per distinct
    value (factorize's `codes`); each kind is written once per distinct value, then taken."""
    if len(text) == 0:
        return value
    booleans = pd.Series(np.where(true_word, "true", "false"), dtype="string")
    choices = pd.concat([text, _canonical_numbers(numbers), booleans], ignore_index=True).array
    kind = np.where(is_numeric, 1, np.where(is_boolean, 2, 0))
    rows = np.where(codes >= 0, kind * len(text) + codes, -1)
    return pd.Series(choices.take(rows, allow_fill=True), index=value.index, dtype="string")


def _reject_rows(rejected: pd.DataFrame, reason: pd.Series, code: pd.Series) -> pd.DataFrame:
    if rejected.empty:
        return pd.DataFrame(columns=[*REJECT_COLUMNS, "reason_code"])
    as_json = (
        rejected[list(FIELDS)]
        .astype(object)
        .where(rejected[list(FIELDS)].notna(), None)
        .to_json(orient="records", lines=True, default_handler=str, force_ascii=False)
        .rstrip("\n")
        .split("\n")
    )
    raw = rejected["raw"].where(rejected["raw"].notna(), pd.Series(as_json, index=rejected.index))
    device = _text(rejected["device_id"]).astype(object) if "device_id" in rejected.columns else None
    return pd.DataFrame(
        {
            "source_file": rejected["source_file"],
            "source_row": rejected["source_row"],
            "device_id": device,
            "raw": raw.map(clip_raw),
            "reason": reason.astype(object),
            "reason_code": code.astype(object),
        }
    ).reset_index(drop=True)
