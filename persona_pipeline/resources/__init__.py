from persona_pipeline.resources.landing_zone import LandingZone
from persona_pipeline.resources.persona_config import PersonaConfig
from persona_pipeline.resources.persona_store import PersonaStore
from persona_pipeline.resources.vector_index import VectorIndex

__all__ = ["LandingZone", "PersonaConfig", "PersonaStore", "VectorIndex"]
