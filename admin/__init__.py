"""`raee-admin`: the operator's command line (tasks, ingest, classify, eval, demo)."""
