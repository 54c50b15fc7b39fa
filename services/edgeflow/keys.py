"""The Redis key layout shared by every service (Feast's own keys are Feast's)."""

from __future__ import annotations

PREFIX = "ef:"

# Pointer to the current graph snapshot version, and the snapshots themselves.
GRAPH_CURRENT = PREFIX + "graph:current"


def graph_snapshot(version: str) -> str:
    return f"{PREFIX}graph:snapshot:{version}"


def graph_meta(version: str) -> str:
    return f"{PREFIX}graph:meta:{version}"


def adjacency(member: int) -> str:
    """SET of the member's connections (read by the merging filters)."""
    return f"{PREFIX}adj:{member}"


def blocked(member: int) -> str:
    """SET of members this member blocked or was blocked by."""
    return f"{PREFIX}blocked:{member}"


def dismissed(member: int) -> str:
    """SET of members this member dismissed from recommendations."""
    return f"{PREFIX}dismissed:{member}"


def list_current(name: str) -> str:
    """Pointer to the live version of a precomputed list set (swapped atomically)."""
    return f"{PREFIX}list:{name}:current"


def list_meta(name: str, version: str) -> str:
    return f"{PREFIX}list:{name}:{version}:meta"


def list_entry(name: str, version: str, member: int) -> str:
    return f"{PREFIX}list:{name}:{version}:m:{member}"


# Latest embedding collection written by `edgeflow train` (Qdrant collection name).
EMBEDDINGS_CURRENT = PREFIX + "embeddings:current"
