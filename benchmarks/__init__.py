"""Benchmarks of persona_pipeline: stage by stage, beside a naive baseline, through Dagster."""
