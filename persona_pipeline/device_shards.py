"""Device shards: which devices a sharded run covers. Pure: no Dagster."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

_TWO_TO_THE_64 = 1 << 64


def device_hash(device_ids: pd.Series) -> np.ndarray:
    """Per device id a hash that is the same in every process and release (pandas' SipHash with
    its fixed key), as signed int64 so every database can store it (the `device_hash` columns)."""
    hashes = pd.util.hash_array(device_ids.to_numpy(dtype=object), categorize=True)
    return hashes.view(np.int64)


def shard_of(device_ids: pd.Series, shards: int) -> np.ndarray:
    """The shard of each device: its unsigned hash modulo the shard count."""
    return (device_hash(device_ids).view(np.uint64) % np.uint64(shards)).astype(np.int64)


@dataclass(frozen=True)
class DeviceShard:
    """Shard `index` of `count`: the devices whose stable hash of device_id is `index` modulo `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"device shard {self.index} is not one of 0..{self.count - 1}")

    def holds(self, device_ids: pd.Series) -> np.ndarray:
        """Per device id, whether this shard holds it."""
        return shard_of(device_ids, self.count) == self.index

    def holds_hash(self, hashes: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
        """SQL: whether a `device_hash` column's device is this shard's. The column holds the
        unsigned hash as signed int64, and SQL's % keeps the dividend's sign: a negative value
        is the unsigned hash minus 2**64, so its shard adds 2**64 modulo the count back."""
        count = self.count
        wrapped = _TWO_TO_THE_64 % count
        return sa.or_(
            sa.and_(hashes >= 0, hashes % count == self.index),
            sa.and_(hashes < 0, (hashes % count + count + wrapped) % count == self.index),
        )
