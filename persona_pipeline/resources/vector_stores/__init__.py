"""Engines behind the VectorIndex resource: one interface (base.VectorStore), two implementations."""
