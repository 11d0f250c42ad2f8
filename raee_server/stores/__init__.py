"""Where exit records live: vector store (Qdrant Edge / server), SQL metadata, migrations."""
