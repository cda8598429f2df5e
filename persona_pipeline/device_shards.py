"""Device shards: which devices a sharded run covers. Pure: no Dagster."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def shard_of(device_ids: pd.Series, shards: int) -> np.ndarray:
    """The shard of each device: a hash that is the same in every process and release
    (pandas' SipHash with its fixed key), modulo the shard count."""
    hashes = pd.util.hash_array(device_ids.to_numpy(dtype=object), categorize=True)
    return (hashes % np.uint64(shards)).astype(np.int64)


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
