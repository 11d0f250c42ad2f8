"""The method: tasks, exit records, policies, the engine (classify and ingest), auto tuning, evaluation."""
