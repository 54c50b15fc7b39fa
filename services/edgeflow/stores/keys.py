"""The Redis key layout shared by every service (Feast's own keys are Feast's).

Redis Cluster runs a Lua script or a multi-key command only on keys of one hash slot, and a
key's slot comes from its hash tag, the part between its first "{" and "}". So keys that a
script touches together share a tag: every key of the graph snapshots carries {graph}, every
key of the event stream's bookkeeping {events}. Per-member keys carry no tag, so members
spread over the cluster's nodes; they are read and written one key per command.
"""

from __future__ import annotations

PREFIX = "ef:"

# Pointer to the current graph snapshot version, and the snapshots themselves: the pointer
# swap and the compaction are scripts over the pointer and two snapshots' keys.
GRAPH_TAG = "{graph}"
GRAPH_CURRENT = f"{PREFIX}{GRAPH_TAG}:current"


def graph_meta(version: str) -> str:
    """HASH of a snapshot: members, edges, its bytes, chunk count and each chunk's sha256."""
    return f"{PREFIX}{GRAPH_TAG}:{version}:meta"


def graph_chunk(version: str, index: int) -> str:
    """STRING: bytes [index x chunk_bytes, (index + 1) x chunk_bytes) of a snapshot."""
    return f"{PREFIX}{GRAPH_TAG}:{version}:chunk:{index}"


def adjacency(member: int) -> str:
    """SET of the member's connections (read by the merging filters)."""
    return f"{PREFIX}adj:{member}"


def blocked(member: int) -> str:
    """SET of members this member blocked or was blocked by."""
    return f"{PREFIX}blocked:{member}"


def dismissed(member: int) -> str:
    """SET of members this member dismissed from recommendations."""
    return f"{PREFIX}dismissed:{member}"


def deactivated(member: int) -> str:
    """STRING, present while the member is deactivated: the time of the deactivate event.
    Read for the candidates of a served list and for the member asking."""
    return f"{PREFIX}deactivated:{member}"


# SET of the members deactivated now (the same as the deactivated(m) keys present): read
# whole by the offline job and the nearline worker, which rank many members' candidates at
# once. One entry per deactivated member.
DEACTIVATED_MEMBERS = f"{PREFIX}deactivated-members"


def impressions(member: int) -> str:
    """HASH of the members shown to this member without an action since: target ->
    "<count>:<unix seconds of the last exposure>". A field counts for a workflow's forDays after
    its last exposure; the key expires that long after the member's last exposure, and holds
    at most impressions.MAX_TARGETS fields (merging/impressions.py)."""
    return f"{PREFIX}impressions:{member}"


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
    return f"{PREFIX}{GRAPH_TAG}:{version}:deltas"


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
# Member events (a STREAM) and the nearline workers' consumer group. Publish's dedup markers,
# the worker's done markers and its counters are written by scripts with the stream.
EVENTS_TAG = "{events}"
EVENTS = PREFIX + EVENTS_TAG
NEARLINE_GROUP = "nearline"
# Channel on which the worker announces the event ids whose lists it stored.
NEARLINE_STORED = PREFIX + "nearline:stored"


def event_seen(event_id: str) -> str:
    """Marks an event id accepted by Publish (dedup of retried publishes)."""
    return f"{EVENTS}:seen:{event_id}"


def event_done(event_id: str) -> str:
    """Marks an event id whose effects the nearline worker stored (dedup of redeliveries)."""
    return f"{EVENTS}:done:{event_id}"


# Events the worker could not apply (malformed, or refused for good), with the reason.
EVENTS_DEAD = f"{EVENTS}:dead"
# HASH of the workers' counters (events applied, dead-lettered).
NEARLINE_STATS = f"{EVENTS}:nearline:stats"


def nearline_lease(consumer: str) -> str:
    """A worker's lease, renewed while it runs: once it expires, the worker is dead and
    another takes over its pending events and removes it from the group."""
    return f"{PREFIX}nearline:lease:{consumer}"
