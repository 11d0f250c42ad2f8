"""Vector store (Qdrant Edge / server), SQL metadata, migrations, consistency checks."""
