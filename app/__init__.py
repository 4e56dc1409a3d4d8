"""Surfing HTTP service: FastAPI routes, schemas, settings and the SQL job store."""
