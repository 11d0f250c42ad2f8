"""The method: exit policies, the engine (classify and ingest), auto tuning, evaluation, doctor."""
