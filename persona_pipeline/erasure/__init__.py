"""Data erasure (right to be forgotten): remove devices from every store and keep them out."""
