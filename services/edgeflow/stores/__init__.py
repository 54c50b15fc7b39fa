"""Where serving state lives, and the one way each process reaches it.

- `redis_client`: the Redis facade. One server or a Redis Cluster behind the same calls;
  every process connects through it.
- `resp`, `resp_cluster`: the RESP fast path for the hot reads (raw pipelines routed by slot).
- `keys`: every Redis key and its hash tag, so each script stays in one cluster slot.
- `lists`: precomputed recommendation lists (offline and nearline writes, serving reads).
- `graph_store`: the member graph's versioned snapshots, one memory-mapped copy per machine.
- `vectors`: member embeddings in Qdrant (its engine in process, or a server).
- `feast_online`: Feast's online rows read straight from its Redis layout.
"""
