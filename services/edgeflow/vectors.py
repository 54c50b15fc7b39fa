"""Member embeddings in Qdrant: a Qdrant server when QDRANT_URL is set, local mode otherwise.

Each training run writes a new collection `members_<graph version>` and then moves the
`ef:embeddings:current` pointer in Redis, so readers switch collections atomically.
Local mode allows one process per path: the candidates service owns it while serving.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

import numpy as np
import redis
from qdrant_client import QdrantClient, models

from edgeflow import keys
from edgeflow.config import Config

_UPSERT_BATCH = 1024


def open_client(cfg: Config) -> QdrantClient:
    if cfg.qdrant_url:
        return QdrantClient(url=cfg.qdrant_url, timeout=5)
    cfg.qdrant_path.mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=str(cfg.qdrant_path))
    except RuntimeError as exc:  # another process holds the local storage lock
        raise RuntimeError(
            f"Qdrant local storage {cfg.qdrant_path} is in use by another process "
            "(the candidates service owns it while the suite is up): run `edgeflow down` "
            "first, or set QDRANT_URL to a Qdrant server"
        ) from exc


def collection_name(version: str) -> str:
    return "members_" + re.sub(r"[^A-Za-z0-9_]", "_", version)


def write_embeddings(
    client: QdrantClient,
    rds: redis.Redis,
    ids: np.ndarray,
    vectors: np.ndarray,
    version: str,
    on_batch: Callable[[int], object] | None = None,
) -> str:
    """Upsert one vector per member into a fresh collection, then make it current.
    `on_batch(points)` is called after each upserted batch."""
    name = collection_name(version)
    if client.collection_exists(name):
        client.delete_collection(name)
    client.create_collection(
        name,
        vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.COSINE),
    )
    for start in range(0, ids.size, _UPSERT_BATCH):
        stop = start + _UPSERT_BATCH
        client.upsert(
            name,
            points=models.Batch(
                ids=[int(x) for x in ids[start:stop]],
                vectors=vectors[start:stop].astype(np.float32).tolist(),
            ),
            wait=True,
        )
        if on_batch is not None:
            on_batch(min(stop, ids.size) - start)
    previous = cast(bytes | None, rds.getset(keys.EMBEDDINGS_CURRENT, name))
    if (
        previous is not None
        and previous.decode() != name
        and client.collection_exists(previous.decode())
    ):
        client.delete_collection(previous.decode())
    return name
