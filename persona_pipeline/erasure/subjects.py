"""Subjects of an erasure (devices, customers) and the suppression list ingest honours. Pure.

The suppression list holds a keyed 64-bit SipHash of each id (stored as 16 hex digits), never
the id: it tells whether an incoming id was erased without saying which ids were. Hashing is
pandas' vectorized `hash_array`, so checking a day of updates is one pass over its distinct ids.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

DEVICE = "device"
CUSTOMER = "customer"
# Changing the key makes every stored hash miss: erased subjects would come back.
HASH_KEY = "persona-erasure1"


def hash_values(ids: Iterable[str]) -> np.ndarray:
    """The 64-bit hash of each id."""
    values = np.asarray(list(ids) if not isinstance(ids, pd.Series | np.ndarray) else ids, dtype=object)
    return pd.util.hash_array(values, hash_key=HASH_KEY, categorize=True)


def hash_texts(ids: Iterable[str]) -> list[str]:
    """The stored form of each id's hash (16 hex digits); for the few ids of a request."""
    return [format(int(value), "016x") for value in hash_values(ids)]


@dataclass(frozen=True)
class Suppression:
    """Hashes of the erased devices and customers."""

    device_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    customer_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    @classmethod
    def from_texts(cls, devices: Iterable[str], customers: Iterable[str]) -> Suppression:
        def parse(texts: Iterable[str]) -> np.ndarray:
            return np.array([int(text, 16) for text in texts], dtype=np.uint64)

        return cls(parse(devices), parse(customers))

    def __bool__(self) -> bool:
        return bool(len(self.device_hashes) or len(self.customer_hashes))

    def matches(self, frame: pd.DataFrame) -> np.ndarray:
        """A mask of the rows whose device or customer is suppressed."""
        mask = np.zeros(len(frame), dtype=bool)
        if not self or frame.empty:
            return mask
        for column, hashes in (("device_id", self.device_hashes), ("customer_id", self.customer_hashes)):
            if len(hashes) and column in frame.columns:
                codes, uniques = pd.factorize(frame[column])
                listed = np.isin(hash_values(uniques.astype(str)), hashes)
                mask |= (codes >= 0) & listed[np.maximum(codes, 0)]
        return mask


def unique_ids(ids: Iterable[str] | None, setting: str) -> list[str]:
    """The ids of a request, stripped, in Unicode NFC as ingest stores them, and deduplicated;
    refuses empty ones naming the setting."""
    cleaned = [unicodedata.normalize("NFC", str(value).strip()) for value in ids or []]
    if any(not value for value in cleaned):
        raise ValueError(f"{setting}: an empty id was given; every id must be non-empty")
    return sorted(set(cleaned))
