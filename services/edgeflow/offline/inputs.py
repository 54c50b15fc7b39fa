"""What a batch run reads: the graph, entity features, embeddings, models and Redis.

Entity features come from Feast's Redis layout through the features service's own reader,
and the exact EBR index is built from the same embeddings (which training writes to Feast as
well as Qdrant). Past EXACT_EBR_MAX members, EBR searches the live HNSW collection the
candidates service searches instead, through a reader of the run's own (a private copy of
the in-process shard, or the Qdrant server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgeflow.candidates.sources import Reader, VectorIndex
from edgeflow.graph import Graph, inverse_log_degree
from edgeflow.offline.pairs import PairIndex
from edgeflow.scoring.registry import ModelRegistry
from edgeflow.stores.feast_online import OnlineReader, OnlineRows
from edgeflow.stores.redis_client import SyncClient

_READ_CHUNK = 2000
# Above this many members a batch run's EBR searches the HNSW collection: an exact search
# costs O(members) a member: 0.29 ms at 100k members against 0.42 for an HNSW search and
# reading its answer, 2.9 ms at 1M (benchmarks/scale_costs.py).
EXACT_EBR_MAX = 150_000


def take(rows: OnlineRows, index: np.ndarray) -> OnlineRows:
    return OnlineRows(rows.scalars[index], rows.embeddings[index], rows.missing[index])


class FeatureSource(Protocol):
    def rows(self, members: np.ndarray) -> OnlineRows: ...


class LiveFeatures:
    """Reads the rows at each call (the nearline worker: pushes land between batches)."""

    def __init__(self, client: SyncClient, reader: OnlineReader | None = None) -> None:
        self._client = client
        self._reader = reader or OnlineReader()

    def rows(self, members: np.ndarray) -> OnlineRows:
        return read_rows(self._client, self._reader, members)


class FeatureTable:
    """Every member's row read once (the offline job: one consistent read per run)."""

    def __init__(self, ids: np.ndarray, table: OnlineRows, fallback: FeatureSource) -> None:
        self.ids = ids  # sorted
        self.table = table  # rows in `ids` order
        self._fallback = fallback

    @classmethod
    def load(cls, client: SyncClient, ids: np.ndarray) -> FeatureTable:
        live = LiveFeatures(client)
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        return cls(ids, live.rows(ids), live)

    def rows(self, members: np.ndarray) -> OnlineRows:
        members = np.asarray(members, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, members), max(self.ids.size - 1, 0))
        known = self.ids[pos] == members if self.ids.size else np.zeros(members.size, bool)
        if not known.all():  # a member the run did not know at its start
            return self._fallback.rows(members)
        return take(self.table, pos)


def read_rows(client: SyncClient, reader: OnlineReader, members: np.ndarray) -> OnlineRows:
    """Rows of many members in chunks, one round trip each."""
    members = np.asarray(members, dtype=np.int64)
    parts = [
        reader.read_sync(client, members[i : i + _READ_CHUNK])
        for i in range(0, max(members.size, 1), _READ_CHUNK)
    ]
    return OnlineRows(
        np.concatenate([p.scalars for p in parts]),
        np.concatenate([p.embeddings for p in parts]),
        np.concatenate([p.missing for p in parts]),
    )


def embedding_index(features: FeatureSource, ids: np.ndarray) -> VectorIndex | None:
    """Members' embeddings as the EBR index (None when no member has one)."""
    rows = features.rows(np.asarray(ids, dtype=np.int64))
    emb = np.nan_to_num(rows.embeddings, nan=0.0)
    if not np.any(emb):
        return None
    return VectorIndex(np.asarray(ids, dtype=np.int64), emb)


@dataclass
class Inputs:
    graph: Graph
    features: FeatureSource
    index: VectorIndex | None
    registry: ModelRegistry
    client: SyncClient
    inv_log_degree: np.ndarray
    # The feature table and the EBR index hold exactly the graph's members, in its order.
    aligned: bool = False
    # The live HNSW collection EBR searches instead of `index` (None: search `index`).
    ann: Reader | None = None
    _pairs: PairIndex | None = field(default=None, repr=False)

    @property
    def pairs(self) -> PairIndex:
        if self._pairs is None or self._pairs.graph is not self.graph:
            self._pairs = PairIndex(self.graph, self.inv_log_degree)
        return self._pairs

    @classmethod
    def build(
        cls,
        graph: Graph,
        features: FeatureSource,
        registry: ModelRegistry,
        client: SyncClient,
        index: VectorIndex | None = None,
        ann: Reader | None = None,
    ) -> Inputs:
        aligned = (
            isinstance(features, FeatureTable)
            and index is not None
            and np.array_equal(features.ids, graph.ids)
            and np.array_equal(index.ids, graph.ids)
        )
        return cls(
            graph, features, index, registry, client, inverse_log_degree(graph), aligned, ann
        )

    def close(self) -> None:
        """Release the HNSW reader (an in-process one deletes its copy of the shard)."""
        ann, self.ann = self.ann, None
        if ann is not None:
            ann.close()
