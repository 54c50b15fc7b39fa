"""Feast objects of edgeflow: the member entity and its features for ranking.

Names come from edgeflow.features.schema, so the repo, the features service, training and
scoring agree on them. `edgeflow train` applies this file in the rendered repo (`feast apply`
there does the same).
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float32
from feast.value_type import ValueType

from edgeflow.features.schema import (
    EMBEDDING_DIM,
    EMBEDDING_FEATURE,
    ENTITY,
    FEATURE_SERVICE,
    FEATURE_VIEW,
    JOIN_KEY,
    PUSH_SOURCE,
    SCALAR_FEATURES,
)

# A member of the social graph; its external id is the join key of every lookup.
member = Entity(
    name=ENTITY,
    join_keys=[JOIN_KEY],
    value_type=ValueType.INT64,
    description="A member of the member graph, keyed by its external id",
)

# Member features computed by `edgeflow train` from the training graph, one row per
# member (relative paths resolve against the rendered repo).
member_features_source = FileSource(
    name="member_features_file",
    path="data/member_features.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
)

# Nearline updates (a new connection changes degrees) are pushed here; pushes land in
# the same online rows as materialised values, and the file source backs offline reads.
member_features_push = PushSource(
    name=PUSH_SOURCE,
    batch_source=member_features_source,
)

# Entity features served online for ranking: graph scalars and the member embedding.
# The ttl is generous because rows are refreshed by each train and by pushes, not aged out.
member_features = FeatureView(
    name=FEATURE_VIEW,
    entities=[member],
    ttl=timedelta(days=3650),
    schema=[
        *(Field(name=name, dtype=Float32) for name in SCALAR_FEATURES),
        Field(
            name=EMBEDDING_FEATURE,
            dtype=Array(Float32),
            vector_length=EMBEDDING_DIM,
            description=f"Member embedding learned from the training graph ({EMBEDDING_DIM}-d)",
        ),
    ],
    online=True,
    source=member_features_push,
    tags={"owner": "edgeflow", "surface": "pymk"},
)

# What the version-1 ranker reads: every feature of the member view.
member_ranking_v1 = FeatureService(
    name=FEATURE_SERVICE,
    features=[member_features],
    description="Entity features of the pymk ranker, version 1",
)
