"""Feature names shared by the Feast repo, the features service, training and scoring.

Entity features live in Feast (feature view `member_features`, entity `member`). Pair
features are computed per request from the graph and the embeddings. MODEL_COLUMNS is the
column order of the matrix the features service returns for a (member, candidates) request.
"""

from __future__ import annotations

from edgeflow.graph import PAIR_COLUMNS

FEAST_PROJECT = "edgeflow"
ENTITY = "member"
JOIN_KEY = "member_id"
FEATURE_VIEW = "member_features"
FEATURE_SERVICE = "member_ranking_v1"
PUSH_SOURCE = "member_features_push"
EMBEDDING_DIM = 32

# Scalar entity features (Float32) in the feature view, in this order, then the embedding.
SCALAR_FEATURES = ("degree", "clustering", "pagerank", "avg_neighbor_degree")
EMBEDDING_FEATURE = "embedding"  # Array(Float32) of EMBEDDING_DIM values
ENTITY_FEATURES = (*SCALAR_FEATURES, EMBEDDING_FEATURE)

# Columns of an entity-only request (no member): scalars, then the embedding spread out.
ENTITY_COLUMNS = (*SCALAR_FEATURES, *(f"embedding_{j}" for j in range(EMBEDDING_DIM)))

# Columns of a (member, candidate) request: what the ranker consumes.
MODEL_COLUMNS = (
    "member_degree",
    "member_clustering",
    "cand_degree",
    "cand_clustering",
    "cand_pagerank",
    "cand_avg_neighbor_degree",
    *PAIR_COLUMNS,
    "embedding_cosine",
)
