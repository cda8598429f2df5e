"""Retry policy for assets that write to the persona store or the vector index."""

import dagster as dg

STORE_RETRY = dg.RetryPolicy(max_retries=2, delay=3, backoff=dg.Backoff.EXPONENTIAL)
