"""Readable tables: one module per kind (Iceberg for now; the source layer lands here)."""
