"""Building what the services serve: graph ingest, embeddings, Feast features, the ranker."""
