"""Alembic migrations of the metadata schema (run by `raee-admin migrate` and on first use)."""
