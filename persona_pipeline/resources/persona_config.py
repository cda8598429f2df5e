"""Access to the YAML configuration (shipped defaults or the `PERSONA_CONFIG_DIR` folder)."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from persona_pipeline.feature_schema import FeatureSchema, load_feature_schema
from persona_pipeline.service_catalog import ServiceCatalog, load_service_catalog


class PersonaConfig(dg.ConfigurableResource):
    """Loads and validates the configuration each run, so edits take effect without a reload."""

    config_dir: str | None = Field(
        default=None,
        description="Folder whose YAML files override the shipped defaults (PERSONA_CONFIG_DIR).",
    )

    def feature_schema(self) -> FeatureSchema:
        return load_feature_schema(self.config_dir)

    def service_catalog(self) -> ServiceCatalog:
        return load_service_catalog(self.config_dir)
