"""The member graph in Redis: versioned, chunked snapshots behind an atomically swapped
pointer, and one memory-mapped copy per machine.

`save_graph` writes a snapshot as chunks of at most CHUNK_BYTES (`ef:{graph}:<V>:chunk:<i>`)
and a meta HASH with each chunk's sha256 (`ef:{graph}:<V>:meta`), then the per-member
adjacency sets that the merging filters read, then swaps `ef:{graph}:current`. Every graph
key carries the hash tag {graph}, so in Redis Cluster the pointer and the snapshots share a
slot and the swap and compaction scripts may touch them together; every script names the
keys it touches in KEYS.

A process that needs the graph (`GraphStore`, `load_graph`) looks for the snapshot's file in
the machine's cache directory (`$EDGEFLOW_HOME/graph/<version>.<sha>.graph`). The first one
downloads the chunks under a file lock, checks each against its sha256, writes a temporary
file and renames it into place; every process then maps that one file read-only, so the
machine's page cache holds the graph once, whatever the number of processes. A missing or
corrupt chunk raises `GraphSnapshotError`, which names the key.

Nearline edge changes go to a delta stream per snapshot (`append_deltas`): each entry holds
edge states (u, v, present), so replaying one twice or late never changes the result.
`GraphStore` applies new deltas on its refresh with `Graph.with_edges`, which keeps the
changed members' adjacency in an overlay over the mapped snapshot (it copies what the batch
touches, not the neighbour array) and swaps the new graph in; `compact_graph` folds a long
stream into a new snapshot, carrying over entries appended meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import redis

from edgeflow.graph import Graph, SnapshotError
from edgeflow.shell.reload import Reloader
from edgeflow.stores import keys
from edgeflow.stores.redis_client import AsyncClient, SyncClient, script

log = logging.getLogger("edgeflow.graph")

_SET_BATCH = 2000
# Snapshots and delta streams replaced by a newer version stay readable this long.
_GRACE_S = 300
_DELTA_COLUMNS = 3  # u, v, present
# Snapshot bytes per Redis value. Redis caps a value at 512 MB; smaller values keep each
# GET short (Redis answers one command at a time) and a reader's buffer small. A little
# under 8 MiB: with Redis's few bytes of header a value of exactly 8 MiB would take
# jemalloc's next size class, 10 MiB.
CHUNK_BYTES = (8 << 20) - 4096
MAX_CHUNK_BYTES = 64 << 20
_PIPELINE_BYTES = 64 << 20  # chunk bytes sent per pipeline round trip when saving
_APPEND_TRIES = 10

# KEYS = pointer, deltas of version ARGV[1]; ARGV = version, packed edge states. Appends to
# the stream of the snapshot the pointer names, if it still names ARGV[1] (else false: the
# caller reads the pointer again).
_APPEND_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
return redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
"""

# KEYS = pointer, new meta, then every key of the snapshot being replaced; ARGV = the version
# the pointer must hold ('' for none), new version, grace seconds. Swaps the pointer only if
# no one else moved it, and lets the old snapshot's keys expire after the grace period.
_SWAP_LUA = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('SET', KEYS[1], ARGV[2])
for i = 3, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

# KEYS = pointer, old deltas, new deltas, then the old snapshot's meta and chunks; ARGV = old
# version, new version, last folded entry id, grace seconds. Moves the pointer only if no
# one else did, carrying the deltas appended after the fold over to the new stream.
_COMPACT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+')) do
  redis.call('XADD', KEYS[3], '*', unpack(entry[2]))
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
for i = 4, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""


class GraphNotLoaded(RuntimeError):
    """No graph has been ingested into this Redis yet."""


class GraphSnapshotError(GraphNotLoaded):
    """A snapshot in Redis is incomplete or corrupt; the message names the key."""


def default_cache_dir() -> Path:
    """Where this machine keeps snapshot files: Config().graph_dir ($EDGEFLOW_HOME/graph)."""
    from edgeflow.config import Config

    return Config().graph_dir


# ---- writing a snapshot ----------------------------------------------------------------------
def _check_version(version: str) -> None:
    if not version or "{" in version or "}" in version or "+" in version:
        raise ValueError(f"graph version {version!r}: must be non-empty, without '{{', '}}', '+'")


def _chunks(graph: Graph, chunk_bytes: int) -> Iterator[bytes]:
    """The snapshot's bytes in pieces of `chunk_bytes` (the last may be shorter)."""
    pending = bytearray()
    for piece in graph.serialised():
        while len(piece):
            take = chunk_bytes - len(pending)
            pending += piece[:take]
            piece = piece[take:]
            if len(pending) == chunk_bytes:
                yield bytes(pending)
                pending = bytearray()
    if pending:
        yield bytes(pending)


def _write_snapshot(
    client: SyncClient,
    graph: Graph,
    chunk_bytes: int,
    data_hash: str | None = None,
    extra: dict[str, str] | None = None,
) -> _Meta:
    """Write a snapshot's chunks, then its meta (whose presence says the chunks are all
    there); returns the meta."""
    version = graph.version
    _check_version(version)
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes {chunk_bytes}: must be 1..{MAX_CHUNK_BYTES}")
    digests: list[str] = []
    total = pending = 0
    client.delete(keys.graph_meta(version))  # the same version saved again: no old TTL
    pipe = client.pipeline(transaction=False)
    for index, chunk in enumerate(_chunks(graph, chunk_bytes)):
        digests.append(hashlib.sha256(chunk).hexdigest())
        pipe.set(keys.graph_chunk(version, index), chunk)
        total += len(chunk)
        pending += len(chunk)
        if pending >= _PIPELINE_BYTES:
            pipe.execute()
            pending = 0
    pipe.execute()
    listing = "".join(digests)
    mapping: dict[str, str | int | float] = {
        "members": graph.n,
        "edges": graph.edge_count,
        "created_at": time.time(),
        "hash": data_hash or graph.data_hash(),
        "bytes": total,
        "chunks": len(digests),
        "chunk_bytes": chunk_bytes,
        "chunk_sha256": listing,
        "sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }
    mapping.update(extra or {})
    client.hset(keys.graph_meta(version), mapping=mapping)
    return _Meta(version, total, chunk_bytes, tuple(digests), str(mapping["sha256"]),
                 **(extra or {}))  # fmt: skip


def _snapshot_keys(version: str, chunks: int) -> list[str]:
    return [keys.graph_meta(version), *(keys.graph_chunk(version, i) for i in range(chunks))]


def _old_keys(client: SyncClient, version: str) -> list[str]:
    """Every key of a snapshot (meta, chunks, deltas), as far as its meta tells."""
    chunks = cast(bytes | None, client.hget(keys.graph_meta(version), "chunks"))
    return [*_snapshot_keys(version, int(chunks or 0)), keys.graph_deltas(version)]


def save_graph(client: SyncClient, graph: Graph, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write a snapshot and adjacency sets, then make it current in one atomic step."""
    version = graph.version
    _write_snapshot(client, graph, chunk_bytes)
    _write_adjacency(client, graph)
    swap = script(client, _SWAP_LUA)
    for _ in range(_APPEND_TRIES):
        raw = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
        previous = raw.decode() if raw is not None else ""
        stale = _old_keys(client, previous) if previous and previous != version else []
        done = swap(
            keys=[keys.GRAPH_CURRENT, keys.graph_meta(version), *stale],
            args=[previous, version, _GRACE_S],
        )
        if done == 1:
            return
        if done == -1:
            raise GraphSnapshotError(f"graph snapshot {version}: {keys.graph_meta(version)} "
                                     "vanished before the pointer swap")  # fmt: skip
    raise RuntimeError(
        f"graph pointer {keys.GRAPH_CURRENT} kept moving; {version} not made current"
    )


def _write_adjacency(client: SyncClient, graph: Graph) -> None:
    """SET of each member's connections (external ids), replacing what was there."""
    if type(client) is not redis.Redis:  # a cluster client routes each command itself
        _write_adjacency_commands(client, graph)
        return
    ids, indptr, indices = graph.ids, graph.indptr, graph.indices
    conn = client.connection_pool.get_connection()
    try:
        start = 0
        while start < graph.n:
            # Members whose neighbour ids make about _ADJ_BATCH bulk strings, at least one.
            stop = int(np.searchsorted(indptr, indptr[start] + _ADJ_BATCH, side="right")) - 1
            stop = min(max(stop, start + 1), graph.n)
            payload, replies = _adjacency_commands(ids, indptr, indices, start, stop)
            conn.send_packed_command([payload])
            for _ in range(replies):
                reply = conn.read_response()
                if isinstance(reply, redis.ResponseError):
                    raise reply
            start = stop
    except BaseException:
        conn.disconnect()  # replies may be left unread: never reuse this connection
        raise
    finally:
        client.connection_pool.release(conn)


_ADJ_BATCH = 1 << 20  # neighbour ids encoded per round trip
_RESP_WIDTH = 26  # the longest bulk string of an id: $19\r\n + 19 digits + \r\n
_POW10 = np.array([10**k for k in range(1, 20)], dtype=np.uint64)


def _bulk_ints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RESP bulk strings ($<len>\\r\\n<digits>\\r\\n) of non-negative int64s, encoded with
    numpy: (their bytes back to back as uint8, the end offset of each)."""
    v = np.asarray(values, dtype=np.int64).astype(np.uint64)
    w = _RESP_WIDTH
    digits = 1 + np.searchsorted(_POW10, v, side="right")
    mat = np.empty((v.size, w), dtype=np.uint8)  # each row right-aligned
    mat[:, w - 2 :] = np.frombuffer(b"\r\n", dtype=np.uint8)
    rest = v.copy()
    for j in range(19):
        mat[:, w - 3 - j] = (rest % 10).astype(np.uint8) + ord("0")
        rest //= 10
    rows = np.arange(v.size)
    at = w - 3 - digits  # the column left of the digits
    mat[rows, at] = ord("\n")
    mat[rows, at - 1] = ord("\r")
    mat[rows, at - 2] = (digits % 10).astype(np.uint8) + ord("0")
    two = digits >= 10
    mat[rows[two], at[two] - 3] = ord("1")
    start = at - 3 - two
    mat[rows, start] = ord("$")
    return mat[np.arange(w)[None, :] >= start[:, None]], np.cumsum(w - start)


def _adjacency_commands(
    ids: np.ndarray, indptr: np.ndarray, indices: np.ndarray, start: int, stop: int
) -> tuple[bytes, int]:
    """DEL and SADD of members start..stop-1 in RESP, and how many replies they get."""
    lo, hi = int(indptr[start]), int(indptr[stop])
    flat, ends = _bulk_ints(ids[indices[lo:hi]])
    data = flat.tobytes()
    ends_l = [0, *ends.tolist()]
    offsets = (indptr[start : stop + 1] - lo).tolist()
    parts: list[bytes] = []
    replies = 0
    for k, member in enumerate(ids[start:stop].tolist()):
        key = keys.adjacency(member).encode()
        parts.append(b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(key), key))
        first, last = offsets[k], offsets[k + 1]
        replies += 1
        if last > first:
            parts.append(b"*%d\r\n$4\r\nSADD\r\n$%d\r\n%s\r\n" % (last - first + 2, len(key), key))
            parts.append(data[ends_l[first] : ends_l[last]])
            replies += 1
    return b"".join(parts), replies


def _write_adjacency_commands(client: SyncClient, graph: Graph) -> None:
    """`_write_adjacency` through the client's own pipeline, one command at a time."""
    pipe = client.pipeline(transaction=False)
    pending = 0
    ids = graph.ids
    for i in range(graph.n):
        member = int(ids[i])
        pipe.delete(keys.adjacency(member))
        nbrs = ids[graph.neighbors(i)]
        if nbrs.size:
            pipe.sadd(keys.adjacency(member), *nbrs.tolist())
        pending += 1
        if pending >= _SET_BATCH:
            pipe.execute()
            pending = 0
    pipe.execute()


# ---- reading a snapshot ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Meta:
    version: str
    size: int  # bytes of the snapshot
    chunk_bytes: int
    digests: tuple[str, ...]  # sha256 of each chunk
    sha256: str  # of the digests: names the snapshot's content
    compacted_from: str = ""  # the snapshot a compaction folded deltas into ...
    folded: str = ""  # ... and the last delta entry id it folded

    @classmethod
    def parse(cls, version: str, raw: dict[bytes, bytes]) -> _Meta:
        key = keys.graph_meta(version)
        try:
            listing = raw[b"chunk_sha256"].decode()
            meta = cls(version, int(raw[b"bytes"]), int(raw[b"chunk_bytes"]),
                       tuple(listing[i : i + 64] for i in range(0, len(listing), 64)),
                       raw[b"sha256"].decode(), raw.get(b"compacted_from", b"").decode(),
                       raw.get(b"folded", b"").decode())  # fmt: skip
            chunks = int(raw[b"chunks"])
        except (KeyError, ValueError) as exc:
            raise GraphSnapshotError(
                f"graph snapshot {version}: {key} lacks a valid field {exc} (written by an "
                "older edgeflow? run `edgeflow ingest` again)"
            ) from None
        if (
            len(meta.digests) != chunks
            or hashlib.sha256(listing.encode()).hexdigest() != meta.sha256
            or not 0 < meta.size <= chunks * meta.chunk_bytes
        ):
            raise GraphSnapshotError(f"graph snapshot {version}: {key} is corrupt")
        return meta

    @property
    def file_name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.version)
        return f"{safe}.{self.sha256[:16]}.graph"

    def chunk_size(self, index: int) -> int:
        last = len(self.digests) - 1
        return self.chunk_bytes if index < last else self.size - last * self.chunk_bytes

    def check(self, index: int, data: bytes | None) -> bytes:
        """The chunk's bytes, or GraphSnapshotError naming its key."""
        key = keys.graph_chunk(self.version, index)
        if data is None:
            raise GraphSnapshotError(
                f"graph snapshot {self.version}: chunk {key} is missing from Redis (expired "
                f"after the {_GRACE_S} s grace period of a replaced snapshot, or lost)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != self.chunk_size(index) or digest != self.digests[index]:
            raise GraphSnapshotError(
                f"graph snapshot {self.version}: chunk {key} is corrupt ({len(data)} bytes, "
                f"sha256 {digest[:16]}; expected {self.chunk_size(index)} bytes, "
                f"{self.digests[index][:16]})"
            )
        return data


def _read_meta(raw: dict[bytes, bytes], version: str) -> _Meta | None:
    return _Meta.parse(version, raw) if raw else None


class _Cache:
    """The machine's snapshot files in one directory; None when it cannot be written, and
    then each process downloads into its own memory."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory or default_cache_dir()
        self.usable = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}-{threading.get_ident()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            log.warning("graph cache %s is not writable (%s): each process keeps its own "
                        "copy of the graph in memory", self.dir, exc)  # fmt: skip
            self.usable = False

    def existing(self, meta: _Meta) -> Graph | None:
        """The mapped snapshot file, if this machine has it."""
        path = self.dir / meta.file_name
        try:
            if path.stat().st_size != meta.size:
                path.unlink()  # not one of ours: files are renamed into place complete
                return None
            graph = Graph.open(path, meta.version)
            with contextlib.suppress(OSError):
                os.utime(path)  # in use: `sweep` leaves recent files alone
            return graph
        except FileNotFoundError:
            return None
        except SnapshotError as exc:
            log.warning("%s; downloading it again", exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One download at a time on this machine (every process, every thread)."""
        with open(self.dir / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def temp(self, meta: _Meta) -> tuple[Path, IO[bytes]]:
        path = self.dir / f".{meta.file_name}.{os.getpid()}.{threading.get_ident()}.tmp"
        return path, open(path, "wb")  # closed by `publish` or `discard`

    def publish(self, meta: _Meta, tmp: Path, fh: IO[bytes]) -> Graph:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        path = self.dir / meta.file_name
        os.replace(tmp, path)  # atomic: readers see no file or the whole one
        self.sweep(keep=path)
        return Graph.open(path, meta.version)

    def write_graph(self, meta: _Meta, graph: Graph) -> Graph | None:
        """The snapshot file written from a graph built here (no download), if its bytes
        are the snapshot's: each chunk must match the meta's sha256. None if they are not."""
        with self.locked():
            existing = self.existing(meta)
            if existing is not None:
                return existing
            tmp, fh = self.temp(meta)
            try:
                count = 0
                for i, chunk in enumerate(_chunks(graph, meta.chunk_bytes)):
                    count = i + 1
                    if (
                        i >= len(meta.digests)
                        or len(chunk) != meta.chunk_size(i)
                        or hashlib.sha256(chunk).hexdigest() != meta.digests[i]
                    ):
                        break
                    fh.write(chunk)
                else:
                    if count == len(meta.digests):
                        return self.publish(meta, tmp, fh)
                self.discard(tmp, fh)
                return None
            except BaseException:
                self.discard(tmp, fh)
                raise

    @staticmethod
    def discard(tmp: Path, fh: IO[bytes]) -> None:
        fh.close()
        with contextlib.suppress(OSError):
            tmp.unlink()

    def sweep(self, keep: Path) -> None:
        """Remove snapshot files (and abandoned temporary files) not used for the grace
        period. A process that still maps one keeps it: unlinking does not unmap."""
        cutoff = time.time() - _GRACE_S
        for path in self.dir.iterdir():
            if path == keep or not path.name.endswith((".graph", ".tmp")):
                continue
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def _download(client: SyncClient, meta: _Meta, cache: _Cache) -> Graph:
    if not cache.usable:
        buf = bytearray()
        for i in range(len(meta.digests)):
            buf += meta.check(i, cast(bytes | None, client.get(keys.graph_chunk(meta.version, i))))
        return Graph.from_bytes(buf, meta.version)
    with cache.locked():
        graph = cache.existing(meta)  # another process may have written it meanwhile
        if graph is not None:
            return graph
        tmp, fh = cache.temp(meta)
        try:
            for i in range(len(meta.digests)):
                key = keys.graph_chunk(meta.version, i)
                fh.write(meta.check(i, cast(bytes | None, client.get(key))))
            return cache.publish(meta, tmp, fh)
        except BaseException:
            cache.discard(tmp, fh)
            raise


def _write_chunk(fh: IO[bytes], meta: _Meta, index: int, data: bytes | None) -> None:
    fh.write(meta.check(index, data))


async def _download_async(client: AsyncClient, meta: _Meta, cache: _Cache) -> Graph:
    """`_download` for the event loop: Redis reads awaited, hashing and disk off the loop."""
    if not cache.usable:
        buf = bytearray()
        for i in range(len(meta.digests)):
            data = await client.get(keys.graph_chunk(meta.version, i))
            buf += await asyncio.to_thread(meta.check, i, data)
        return await asyncio.to_thread(Graph.from_bytes, buf, meta.version)
    lock = cache.locked()
    await asyncio.to_thread(lock.__enter__)
    try:
        graph = await asyncio.to_thread(cache.existing, meta)
        if graph is not None:
            return graph
        tmp, fh = await asyncio.to_thread(cache.temp, meta)
        try:
            for i in range(len(meta.digests)):
                data = await client.get(keys.graph_chunk(meta.version, i))
                await asyncio.to_thread(_write_chunk, fh, meta, i, data)
            return await asyncio.to_thread(cache.publish, meta, tmp, fh)
        except BaseException:
            cache.discard(tmp, fh)
            raise
    finally:
        lock.__exit__(None, None, None)


def open_snapshot(client: SyncClient, version: str, cache_dir: Path | None = None) -> Graph:
    """Snapshot `version` (without deltas), mapped from this machine's file, which is
    downloaded from Redis first if no process here has done it yet."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.graph_meta(version)))
    meta = _read_meta(raw, version)
    if meta is None:
        raise GraphNotLoaded(
            f"graph snapshot {version} is missing from Redis (no {keys.graph_meta(version)})"
        )
    cache = _Cache(cache_dir)
    graph = cache.existing(meta) if cache.usable else None
    return graph if graph is not None else _download(client, meta, cache)


def load_graph(client: SyncClient, deltas: bool = True, cache_dir: Path | None = None) -> Graph:
    """The current snapshot, with the nearline edge changes made since it unless `deltas`
    is False."""
    version = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
    if version is None:
        raise GraphNotLoaded("no member graph in Redis: run `edgeflow ingest --edges FILE` first")
    graph = open_snapshot(client, version.decode(), cache_dir)
    if not deltas:
        return graph
    last, changes = _decode_deltas(cast(_Entries, client.xrange(keys.graph_deltas(graph.version))))
    return graph if last is None else _applied(graph, graph.version, last, changes)


# ---- nearline edge changes -------------------------------------------------------------------
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def pack_changes(pairs: np.ndarray, present: np.ndarray) -> bytes:
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    rows = np.column_stack([pairs, np.asarray(present, dtype=np.int64).reshape(-1)])
    return rows.astype("<i8").tobytes()


def _decode_deltas(entries: _Entries) -> tuple[str | None, np.ndarray]:
    """(last entry id, (m, 3) int64 rows of u, v, present) of XRANGE entries, in order."""
    if not entries:
        return None, np.zeros((0, _DELTA_COLUMNS), dtype=np.int64)
    blob = b"".join(fields[b"e"] for _, fields in entries)
    rows = np.frombuffer(blob, dtype="<i8").reshape(-1, _DELTA_COLUMNS).astype(np.int64)
    return entries[-1][0].decode(), rows


def _applied(graph: Graph, snapshot: str, last: str, changes: np.ndarray) -> Graph:
    return graph.with_edges(changes[:, :2], changes[:, 2] != 0, version=f"{snapshot}+{last}")


def snapshot_of(graph: Graph) -> str:
    """The snapshot version a graph was loaded from (its version before any `+delta`)."""
    return graph.version.split("+", 1)[0]


def append_deltas(client: SyncClient, pairs: np.ndarray, present: np.ndarray) -> str | None:
    """Record edge states against the current snapshot; returns the entry id (None without a
    graph). The adjacency SETs are the truth these states were read from."""
    packed = pack_changes(pairs, present)
    append = script(client, _APPEND_LUA)
    for _ in range(_APPEND_TRIES):  # again when a compaction moves the pointer in between
        current = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
        if current is None:
            return None
        version = current.decode()
        reply = append(keys=[keys.GRAPH_CURRENT, keys.graph_deltas(version)],
                       args=[version, packed])  # fmt: skip
        if reply:
            return bytes(reply).decode()
    raise RuntimeError(f"graph pointer {keys.GRAPH_CURRENT} kept moving; deltas not appended")


def read_deltas(client: SyncClient, graph: Graph) -> Graph:
    """`graph` with the deltas appended since it was loaded (the same graph when none)."""
    snapshot = snapshot_of(graph)
    after = graph.version.split("+", 1)[1] if "+" in graph.version else "0-0"
    entries = cast(_Entries, client.xrange(keys.graph_deltas(snapshot), f"({after}", "+"))
    last, changes = _decode_deltas(entries)
    return graph if last is None else _applied(graph, snapshot, last, changes)


def compact_graph(client: SyncClient, min_deltas: int, cache_dir: Path | None = None) -> str | None:
    """Fold the current delta stream into a new snapshot once it holds `min_deltas` entries;
    returns the new version, or None when there was nothing (or someone else) to do it."""
    current = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
    if current is None:
        return None
    old = current.decode()
    if int(cast(int, client.xlen(keys.graph_deltas(old)))) < max(min_deltas, 1):
        return None
    graph = open_snapshot(client, old, cache_dir)
    last, changes = _decode_deltas(cast(_Entries, client.xrange(keys.graph_deltas(old))))
    if last is None:
        return None
    merged = _applied(graph, old, last, changes).compacted()  # one new CSR: O(edges)
    digest = merged.data_hash()
    fresh = Graph(merged.ids, merged.indptr, merged.indices,
                  f"{int(time.time() * 1000)}-{digest[:12]}")  # fmt: skip
    if fresh.version == old:
        return None
    meta = _write_snapshot(client, fresh, CHUNK_BYTES, digest,
                           {"compacted_from": old, "folded": last})  # fmt: skip
    old_chunks = int(cast(bytes | None, client.hget(keys.graph_meta(old), "chunks")) or 0)
    moved = script(client, _COMPACT_LUA)(
        keys=[keys.GRAPH_CURRENT, keys.graph_deltas(old), keys.graph_deltas(fresh.version),
              *_snapshot_keys(old, old_chunks)],
        args=[old, fresh.version, last, _GRACE_S],
    )  # fmt: skip
    if not moved:
        client.delete(*_snapshot_keys(fresh.version, len(meta.digests)))
        return None
    cache = _Cache(cache_dir)
    if cache.usable:  # this machine's processes need not download what it just wrote
        try:
            cache.write_graph(meta, fresh)
        except OSError as exc:
            log.warning("graph cache %s: %s", cache.dir, exc)
    return fresh.version


def _inverse_log(degree: np.ndarray) -> np.ndarray:
    """graph.inverse_log_degree of these degrees (the same operations, so the same bits)."""
    deg = degree.astype(np.float64)
    out = np.zeros_like(deg)
    np.divide(1.0, np.log(np.maximum(deg, 2.0)), out=out, where=deg > 1)
    return out


class GraphStore:
    """The current graph, mapped from this machine's snapshot file and refreshed when the
    pointer in Redis moves or deltas arrive."""

    def __init__(
        self,
        client: AsyncClient,
        reload_interval_s: float = 2.0,
        cache_dir: Path | None = None,
    ) -> None:
        self._client = client
        self._cache_dir = cache_dir
        self._cache: _Cache | None = None
        self._graph: Graph | None = None
        self._snapshot = ""  # the snapshot version the graph was built from
        self._inv_log_deg: np.ndarray | None = None
        self._base_inv: tuple[Graph, np.ndarray] | None = None  # the snapshot's own
        self._reloader = Reloader(
            "graph refresh", reload_interval_s, self.load, log,
            expected=(redis.RedisError, OSError, GraphNotLoaded),
        )  # fmt: skip
        self.on_reload: list = []  # callbacks(graph) run after a swap

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            raise GraphNotLoaded("no member graph loaded: run `edgeflow ingest --edges FILE`")
        return self._graph

    @property
    def inv_log_degree(self) -> np.ndarray:
        if self._inv_log_deg is None:
            raise GraphNotLoaded("no member graph loaded")
        return self._inv_log_deg

    async def _open(self, version: str) -> Graph | None:
        raw = await cast(
            Awaitable[dict[bytes, bytes]], self._client.hgetall(keys.graph_meta(version))
        )
        meta = _read_meta(raw, version)
        if meta is None:
            return None
        if self._cache is None:
            self._cache = await asyncio.to_thread(_Cache, self._cache_dir)
        cache = self._cache
        graph = await asyncio.to_thread(cache.existing, meta) if cache.usable else None
        if graph is None and cache.usable:
            graph = await self._derive(meta, cache)
        return graph if graph is not None else await _download_async(self._client, meta, cache)

    async def _derive(self, meta: _Meta, cache: _Cache) -> Graph | None:
        """A compaction of the snapshot held here, built from it and the deltas it folded
        instead of downloaded: the machine file is written only if every chunk's sha256
        matches, so the result is the snapshot's very bytes. None when that cannot be done."""
        held = self._graph
        if held is None or not meta.folded or meta.compacted_from != snapshot_of(held):
            return None
        entries = await self._client.xrange(keys.graph_deltas(meta.compacted_from), "-",
                                            meta.folded)  # fmt: skip
        last, changes = _decode_deltas(entries)
        if last != meta.folded:  # the old stream expired or was trimmed
            return None

        def build() -> Graph | None:
            graph = _applied(held.snapshot_graph(), meta.compacted_from, last, changes)
            return cache.write_graph(meta, graph.compacted(meta.version))

        graph = await asyncio.to_thread(build)
        (log.info if graph is not None else log.warning)(
            "graph snapshot %s %s from %s and its deltas", meta.version,
            "built" if graph is not None else "could not be built (downloading it)",
            meta.compacted_from,
        )  # fmt: skip
        return graph

    def _inverse_log_degree(self, graph: Graph) -> np.ndarray:
        """inverse_log_degree(graph), from the snapshot's own values when the graph only adds
        an overlay to it: a refresh recomputes the changed members, not all of them."""
        base = self._base_inv
        if base is None or not graph.shares_snapshot(base[0]):
            return _inverse_log(graph.degree)
        rows = graph.changed_rows
        if not rows.size:
            return base[1]
        out = np.zeros(graph.n, dtype=np.float64)
        out[: base[1].size] = base[1]
        out[rows] = _inverse_log(graph.degree[rows])
        return out

    async def load(self) -> bool:
        """Load the current snapshot if it changed, then the edge changes made since; True
        when a new graph was swapped in. Raises GraphSnapshotError (naming the key) when the
        current snapshot's chunks are missing or corrupt."""
        version = await self._client.get(keys.GRAPH_CURRENT)
        if version is None:
            return False
        v = version.decode()
        graph = self._graph
        if graph is None or self._snapshot != v:
            graph = await self._open(v)
            if graph is None:
                return False
            self._base_inv = (graph, await asyncio.to_thread(_inverse_log, graph.degree))
        after = graph.version.split("+", 1)[1] if "+" in graph.version else "0-0"
        entries = await self._client.xrange(keys.graph_deltas(v), f"({after}", "+")
        last, changes = _decode_deltas(entries)
        if last is not None:
            graph = await asyncio.to_thread(_applied, graph, v, last, changes)
        if graph is self._graph:
            return False
        new_snapshot, self._snapshot = self._snapshot != v, v
        self._inv_log_deg = await asyncio.to_thread(self._inverse_log_degree, graph)
        self._graph = graph
        for callback in self.on_reload:
            callback(graph)
        # Snapshots are rare; edge deltas arrive all the time.
        (log.info if new_snapshot else log.debug)(
            "graph %s loaded: %d members, %d edges", graph.version, graph.n, graph.edge_count
        )
        return True

    def start_watching(self) -> None:
        self._reloader.start()

    async def close(self) -> None:
        await self._reloader.close()


def warm_sample(store: GraphStore | None, n: int = 64) -> tuple[int, np.ndarray]:
    """A member and up to `n` other ids to warm a service up with (Service.warm): from the
    middle of the sorted ids, so not picked for its degree; made up while no graph is loaded
    (an unknown member's reads open the same connections)."""
    graph = store._graph if store is not None else None
    if graph is None or graph.n == 0:
        return 0, np.arange(1, n + 1, dtype=np.int64)
    mid = graph.n // 2
    return int(graph.ids[mid]), np.asarray(graph.ids[mid + 1 : mid + 1 + n], dtype=np.int64)
