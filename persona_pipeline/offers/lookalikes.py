"""Lookalikes of the devices that accepted a service: Qdrant's recommendation query."""

from __future__ import annotations

import pandas as pd

from persona_pipeline.offers import storage
from persona_pipeline.resources import PersonaStore, VectorIndex
from persona_pipeline.resources.vector_index import point_ids
from persona_pipeline.service_catalog import ServiceCatalog

MAX_EXAMPLES = 200  # positive and negative examples per recommendation query, each


def lookalike_hits(
    store: PersonaStore, vector_index: VectorIndex, day: str, since_day: str, catalog: ServiceCatalog
) -> pd.DataFrame:
    """Per service with enough responses and an accepting device: the nearest devices not offered
    it from `since_day` to the day before `day`. The devices offered it on `day` itself stay in
    the query, so a re-run of the day finds the same devices again (their offers exist, nothing
    is added) instead of the next nearest ones; `recommend` adds new ones only within the day's
    lookalike limit."""
    known = storage.read_lookalike_examples(store, MAX_EXAMPLES)
    counts = known.responses.set_index("service_id").sort_index()
    eligible = counts[
        (counts["responses"] >= catalog.rules.lookalike_min_responses) & (counts["accepted"] > 0)
    ].index
    if eligible.empty:
        return pd.DataFrame(columns=["service_id", "device_id", "rank", "accepters"])
    offered_before = storage.read_offered_devices(store, eligible.tolist(), since_day, day)
    offered_by_service = offered_before.groupby("service_id")["device_id"].agg(list).to_dict()
    frames = []
    with vector_index.open() as index:
        collection = index.alias_target(vector_index.alias)
        if collection is None:
            return pd.DataFrame(columns=["service_id", "device_id", "rank", "accepters"])
        for service_id in eligible:
            examples = known.examples[known.examples["service_id"] == service_id]
            positive = examples.loc[examples["accepted"], "device_id"].to_numpy()
            negative = examples.loc[~examples["accepted"], "device_id"].to_numpy()
            offered = offered_by_service.get(service_id, [])
            found = index.recommend(
                collection,
                point_ids(positive),
                point_ids(negative),
                limit=catalog.rules.lookalike_per_service,
                exclude={"device_id": offered},
            )
            frames.append(
                pd.DataFrame(
                    {
                        "service_id": service_id,
                        "device_id": [hit.payload["device_id"] for hit in found],
                        "rank": range(len(found)),
                        "accepters": len(positive),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)
