"""Raw key values as a person reads them in reasons and segment profiles. Pure."""

from __future__ import annotations

import numpy as np
import pandas as pd


def format_values(values: pd.Series | np.ndarray, unit: str | None) -> pd.Series:
    """Numbers with at most three significant digits and their unit; `seconds` as s/min/h.

    Missing values read "not reported".
    """
    numbers = pd.Series(values, dtype="float64").reset_index(drop=True)
    unit = unit if isinstance(unit, str) else None
    if unit == "seconds":
        text = _seconds(numbers)
    else:
        suffix = "" if not unit else (unit if unit.startswith("%") else f" {unit}")
        text = _significant_text(numbers) + suffix
    return text.where(numbers.notna(), "not reported")


def format_range(low: pd.Series, high: pd.Series, unit: str | None) -> pd.Series:
    """`low–high unit` (the unit once when both ends share it), or one value when both read the same."""
    unit = unit if isinstance(unit, str) else None
    low_text = format_values(low, unit)
    high_text = format_values(high, unit)
    low_number, low_suffix = _split_number(low_text)
    _, high_suffix = _split_number(high_text)
    low_part = low_number.where(low_suffix == high_suffix, low_text)
    dash = pd.Series(np.where(low_text.str.startswith("-"), " to ", "–"), index=low_text.index)
    return low_text.where(low_text == high_text, low_part + dash + high_text)


def format_share(shares: pd.Series | np.ndarray) -> pd.Series:
    return (pd.Series(shares, dtype="float64").reset_index(drop=True) * 100).round().astype("Int64").astype(
        str
    ) + "%"


def _significant(number: float) -> str:
    if not np.isfinite(number):
        return ""
    if abs(number) >= 1000:
        return f"{number:,.0f}"
    if number == int(number):
        return f"{int(number)}"
    return f"{number:.3g}"


def _significant_text(numbers: pd.Series) -> pd.Series:
    """`_significant` of each number, written once per distinct number."""
    codes, distinct = pd.factorize(numbers.to_numpy(dtype="float64"))  # NaN: code -1
    text = np.array([*map(_significant, distinct.tolist()), _significant(np.nan)], dtype=object)
    return pd.Series(text[codes], index=numbers.index)


def _seconds(seconds: pd.Series) -> pd.Series:
    hours = _significant_text((seconds / 3600).round(1)) + " h"
    minutes = _significant_text((seconds / 60).round()) + " min"
    plain = _significant_text(seconds.round()) + " s"
    return plain.where(seconds < 60, minutes.where(seconds < 3600, hours))


def _split_number(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """ "-70 dBm" -> ("-70", " dBm"); text without a leading number -> (text, "")."""
    parts = text.str.extract(r"^(-?[0-9.]+(?:e[+-]?[0-9]+)?)(.*)$")
    return parts[0].fillna(text), parts[1].fillna("")
