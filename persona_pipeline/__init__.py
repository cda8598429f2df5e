"""persona_pipeline: device key-value updates to persona vectors, segments, anomalies and offers."""
