"""The Redis key layout shared by every service (Feast's own keys are Feast's)."""

from __future__ import annotations

PREFIX = "ef:"

# Pointer to the current graph snapshot version, and the snapshots themselves. Every key of
# one snapshot carries its version as the hash tag ({version}): in Redis Cluster they share a
# slot, so one script may touch them all.
GRAPH_CURRENT = PREFIX + "graph:current"


def graph_meta(version: str) -> str:
    """HASH of a snapshot: members, edges, its bytes, chunk count and each chunk's sha256."""
    return f"{PREFIX}graph:{{{version}}}:meta"


def graph_chunk(version: str, index: int) -> str:
    """STRING: bytes [index x chunk_bytes, (index + 1) x chunk_bytes) of a snapshot."""
    return f"{PREFIX}graph:{{{version}}}:chunk:{index}"


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


def list_nearline(name: str, version: str) -> str:
    """SET of members whose entry the nearline worker rewrote inside this version."""
    return f"{PREFIX}list:{name}:{version}:nearline"


# Graph changes since a snapshot (a STREAM of edge states), followed by every GraphStore.
def graph_deltas(version: str) -> str:
    return f"{PREFIX}graph:{{{version}}}:deltas"


def follows(member: int) -> str:
    """SET of members this member follows."""
    return f"{PREFIX}follows:{member}"


# ---- offline runs ---------------------------------------------------------------------------
def offline_pending(name: str) -> str:
    """HASH of the run of a list that is in progress (its version, shard count, ...)."""
    return f"{PREFIX}offline:{name}:pending"


def offline_progress(name: str, version: str) -> str:
    """HASH per shard of a run: the last member done and how many (the resume checkpoint)."""
    return f"{PREFIX}offline:{name}:{version}:progress"


def offline_done(name: str, version: str) -> str:
    """SET of the shard indices of a run that finished."""
    return f"{PREFIX}offline:{name}:{version}:done"


# ---- nearline -------------------------------------------------------------------------------
# Member events (a STREAM) and the nearline workers' consumer group.
EVENTS = PREFIX + "events"
NEARLINE_GROUP = "nearline"
# Channel on which the worker announces the event ids whose lists it stored.
NEARLINE_STORED = PREFIX + "nearline:stored"


def event_seen(event_id: str) -> str:
    """Marks an event id accepted by Publish (dedup of retried publishes)."""
    return f"{PREFIX}event:seen:{event_id}"


def event_done(event_id: str) -> str:
    """Marks an event id whose effects the nearline worker stored (dedup of redeliveries)."""
    return f"{PREFIX}event:done:{event_id}"


# Events the worker could not apply (malformed, or refused for good), with the reason.
EVENTS_DEAD = PREFIX + "events:dead"
# HASH of the workers' counters (events applied, dead-lettered).
NEARLINE_STATS = PREFIX + "nearline:stats"


def nearline_lease(consumer: str) -> str:
    """A worker's lease, renewed while it runs: once it expires, the worker is dead and
    another takes over its pending events and removes it from the group."""
    return f"{PREFIX}nearline:lease:{consumer}"
