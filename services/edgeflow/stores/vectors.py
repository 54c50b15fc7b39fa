"""Member embeddings: a Qdrant server when QDRANT_URL is set, Qdrant's engine in process
(qdrant-edge) otherwise.

Each training run writes a new collection `members_<graph version>` and then moves the
`ef:embeddings:current` pointer in Redis, so readers switch collections atomically.

In process, a collection is an HNSW-indexed EdgeShard under `$EDGEFLOW_HOME/qdrant`:

- training builds it in a fresh directory (`shards/.build-<host>-<pid>-<collection>`),
  indexes it, closes it, writes `edgeflow.json` (what it holds, a build id, a probe point)
  and renames the directory to `shards/<collection>` before it moves the pointer. A sealed
  shard is never opened again: only one process may open a shard directory (the engine
  locks it), and loading one rewrites its config file.
- each reading process (the candidates service) copies the sealed shard to its own
  `readers/<host>-<pid>-<n>-<collection>` and opens that copy (EdgeReplica), so any number
  of readers and a training run never share a directory. The copy keeps the holes of
  sparse files; opening checks the point count and the probe point, so a missing, partial
  or corrupt shard is refused with its path. A reader also follows a shard rebuilt under
  the same name (its build id changes). Copies of processes that died are deleted.
- the offline job and the nearline worker do not read these shards (they take embeddings
  from Feast's rows), nor does the features service (embedding cosine from Feast too).
- training keeps the current and the previous sealed shard (a reader may still be copying
  the previous one) and deletes older ones; a reader deletes its copy when it switches.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import qdrant_edge as qe
from qdrant_client import QdrantClient, models

from edgeflow.config import Config
from edgeflow.stores import keys
from edgeflow.stores.redis_client import SyncClient

log = logging.getLogger("edgeflow.vectors")

_UPSERT_BATCH = 1024  # points per request to a Qdrant server
_EDGE_BATCH = 10_000  # points per in-process update
MARKER = "edgeflow.json"  # in a sealed shard: what it holds
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_COPIES = itertools.count()  # a process may hold two copies of one shard while it switches
_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float32)


class ShardUnavailable(RuntimeError):
    """An in-process shard is missing, incomplete or unreadable; the message names it."""


@dataclass(frozen=True)
class Hnsw:
    """The index of both engines (QDRANT_HNSW_M, _EF_CONSTRUCT, _EF, QDRANT_QUANTIZATION)."""

    m: int = 16
    ef_construct: int = 64
    ef: int = 128  # candidate list of a search; a search for more results widens it
    quantization: str = "none"  # or "int8": scalar quantization, searched then rescored
    oversampling: float = 2.0  # quantized candidates per result before the exact rescore

    @classmethod
    def from_config(cls, cfg: Config) -> Hnsw:
        for var, value in (
            ("QDRANT_HNSW_M", cfg.hnsw_m),
            ("QDRANT_HNSW_EF_CONSTRUCT", cfg.hnsw_ef_construct),
            ("QDRANT_HNSW_EF", cfg.hnsw_ef),
        ):
            if value < 1:
                raise ValueError(f"{var} must be at least 1, got {value}")
        if cfg.qdrant_quantization not in ("int8", "none"):
            raise ValueError(
                f"QDRANT_QUANTIZATION must be 'int8' or 'none', got {cfg.qdrant_quantization!r}"
            )
        return cls(cfg.hnsw_m, cfg.hnsw_ef_construct, cfg.hnsw_ef, cfg.qdrant_quantization)

    @property
    def quantized(self) -> bool:
        return self.quantization == "int8"


def collection_name(version: str) -> str:
    return "members_" + re.sub(r"[^A-Za-z0-9_]", "_", version)


def _with_vectors(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The members that have an embedding: an isolated member's zero vector has no
    direction, so it is not stored (it is never a neighbour and has none)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    keep = np.any(vectors != 0, axis=1) & np.all(np.isfinite(vectors), axis=1)
    return np.asarray(ids, dtype=np.int64)[keep], vectors[keep]


def storable(vectors: np.ndarray) -> int:
    """How many of these embeddings a collection stores (see _with_vectors)."""
    vectors = np.asarray(vectors)
    return int((np.any(vectors != 0, axis=1) & np.all(np.isfinite(vectors), axis=1)).sum())


# ---- writing -----------------------------------------------------------------------------------
@dataclass
class Written:
    """What one collection write did (for training's report and the benchmark)."""

    points: int
    upsert_s: float
    index_s: float
    bytes_on_disk: int = 0


class ServerStore:
    """Collections on a Qdrant server (QDRANT_URL), with the configured shards, replication
    factor and HNSW index. Also drives qdrant-client's local mode (tests)."""

    def __init__(
        self, client: QdrantClient, shards: int = 1, replicas: int = 1, hnsw: Hnsw = Hnsw()
    ) -> None:
        if shards < 1 or replicas < 1:
            raise ValueError(
                f"QDRANT_SHARDS and QDRANT_REPLICAS must be at least 1, got {shards}, {replicas}"
            )
        self.client, self.shards, self.replicas, self.hnsw = client, shards, replicas, hnsw

    def describe(self) -> str:
        return (
            f"Qdrant server, {self.shards} shard(s) x {self.replicas} replica(s), "
            f"HNSW m {self.hnsw.m}"
        )

    def begin(
        self,
        name: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        on_batch: Callable[[int], object] | None = None,
    ) -> Build:
        """Create collection `name` afresh and upsert the vectors; the server indexes them
        in the background (searches are correct meanwhile), so `finish` has nothing to do."""
        ids, vectors = _with_vectors(ids, vectors)
        client, hnsw = self.client, self.hnsw
        if client.collection_exists(name):
            client.delete_collection(name)
        quantization = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(
                    type=models.ScalarType.INT8, quantile=0.99, always_ram=True
                )
            )
            if hnsw.quantized
            else None
        )
        client.create_collection(
            name,
            vectors_config=models.VectorParams(
                size=vectors.shape[1] if vectors.ndim == 2 else 0,
                distance=models.Distance.COSINE,
            ),
            shard_number=self.shards,
            replication_factor=self.replicas,
            hnsw_config=models.HnswConfigDiff(m=hnsw.m, ef_construct=hnsw.ef_construct),
            quantization_config=quantization,
        )
        start = time.perf_counter()
        for lo in range(0, ids.size, _UPSERT_BATCH):
            hi = min(lo + _UPSERT_BATCH, ids.size)
            client.upsert(
                name,
                points=models.Batch(ids=ids[lo:hi].tolist(), vectors=vectors[lo:hi].tolist()),
                wait=True,
            )
            if on_batch is not None:
                on_batch(hi - lo)
        return _ServerBuild(name, Written(int(ids.size), time.perf_counter() - start, 0.0))

    def drop_old(self, current: str, previous: str | None) -> None:
        """Delete the collection the pointer named before (readers query the server, so
        they move to the new one on their next refresh)."""
        if previous is not None and previous != current and self.client.collection_exists(previous):
            self.client.delete_collection(previous)

    def close(self) -> None:
        self.client.close()


class EdgeStore:
    """Sealed in-process shards under `root/shards` (see the module's docstring)."""

    def __init__(self, root: Path, hnsw: Hnsw = Hnsw()) -> None:
        self.root, self.hnsw = root, hnsw

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def describe(self) -> str:
        quant = ", int8" if self.hnsw.quantized else ""
        return f"in process (qdrant-edge HNSW m {self.hnsw.m}{quant}), {self.shards}"

    def config(self, dim: int) -> qe.EdgeConfig:
        hnsw = self.hnsw
        quantization = (
            qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
            if hnsw.quantized
            else None
        )
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(
                m=hnsw.m, ef_construct=hnsw.ef_construct, full_scan_threshold=10
            ),
            quantization_config=quantization,
            # One indexed segment, whatever the size: every search is an HNSW search.
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1, default_segment_number=1),
            # Written once and flushed before it is sealed: no write-ahead log to keep.
            wal_enabled=False,
            # One segment to search: the calling thread does it, no pool hand-off.
            max_search_threads=1,
        )

    def begin(
        self,
        name: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        on_batch: Callable[[int], object] | None = None,
    ) -> Build:
        """Upsert the vectors into a fresh build directory; `finish` indexes and seals it
        as `shards/<name>` (replacing a sealed shard of that name)."""
        ids, vectors = _with_vectors(ids, vectors)
        dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
        if dim < 1:
            raise ValueError("embeddings have no dimensions")
        self.shards.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.shards, f".build-{_HOST}-")
        path = self.shards / f".build-{_HOST}-{os.getpid()}-{name}"
        shutil.rmtree(path, ignore_errors=True)
        shard = qe.EdgeShard.create(str(path), self.config(dim))
        build = _EdgeBuild(self, name, path, shard, int(ids.size), dim)
        build.probe = int(ids[0]) if ids.size else None
        try:
            start = time.perf_counter()
            for lo in range(0, ids.size, _EDGE_BATCH):
                hi = min(lo + _EDGE_BATCH, ids.size)
                # One Point per member is the engine's only way in (~2 us each with a
                # numpy row); the update itself runs in Rust.
                points = list(map(qe.Point, ids[lo:hi].tolist(), vectors[lo:hi]))
                shard.update(qe.UpdateOperation.upsert_points(points))
                if on_batch is not None:
                    on_batch(hi - lo)
            build.upsert_s = time.perf_counter() - start
        except BaseException:
            build.abort()
            raise
        return build

    def drop_old(self, current: str, previous: str | None) -> None:
        """Keep the current and the previous shard (a reader may still be copying it)."""
        keep = {current, previous}
        for path in self.shards.iterdir() if self.shards.is_dir() else ():
            if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
        _remove_stale(self.shards, f".retired-{_HOST}-")

    def close(self) -> None:
        pass


class Build(Protocol):
    """A collection written but not yet current: `finish` makes it searchable (in process:
    builds the HNSW index and seals the shard), `abort` deletes it."""

    name: str
    points: int

    def finish(self) -> Written: ...

    def abort(self) -> None: ...


class _ServerBuild:
    def __init__(self, name: str, written: Written) -> None:
        self.name, self.points, self._written = name, written.points, written

    def finish(self) -> Written:
        return self._written

    def abort(self) -> None:
        pass


class _EdgeBuild:
    def __init__(
        self, store: EdgeStore, name: str, path: Path, shard: qe.EdgeShard, points: int, dim: int
    ) -> None:
        self.store, self.name, self.path, self.points, self.dim = store, name, path, points, dim
        self._shard: qe.EdgeShard | None = shard
        self.upsert_s = 0.0
        self.probe: int | None = None  # a point readers check to trust the shard

    def finish(self) -> Written:
        shard, hnsw = self._shard, self.store.hnsw
        if shard is None:
            raise RuntimeError(f"shard {self.path} was already finished or aborted")
        try:
            start = time.perf_counter()
            shard.optimize()  # builds the HNSW index (and the quantized vectors)
            shard.flush()
            index_s = time.perf_counter() - start
            held = shard.info().points_count
            if held != self.points:
                raise ShardUnavailable(
                    f"shard {self.path} holds {held} points after writing {self.points}"
                )
            shard.close()
            self._shard = None
            marker = {
                "collection": self.name,
                "build": uuid.uuid4().hex,
                "points": self.points,
                "dim": self.dim,
                "hnsw": {"m": hnsw.m, "ef_construct": hnsw.ef_construct},
                "quantization": hnsw.quantization,
                "probe": self.probe,
                "created": time.time(),
            }
            (self.path / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            final = self.store.shards / self.name
            _seal(self.path, final)
        except BaseException:
            self.abort()
            raise
        return Written(self.points, self.upsert_s, index_s, _disk_usage(final))

    def abort(self) -> None:
        shard, self._shard = self._shard, None
        if shard is not None:
            with contextlib.suppress(Exception):
                shard.close()
        shutil.rmtree(self.path, ignore_errors=True)


Store = ServerStore | EdgeStore


def server_client(cfg: Config) -> QdrantClient:
    """A client of the Qdrant server at QDRANT_URL, with QDRANT_API_KEY (the api-key header)
    when one is set."""
    return QdrantClient(url=cfg.qdrant_url, api_key=cfg.qdrant_api_key or None, timeout=5)


def open_store(cfg: Config) -> Store:
    """Where `edgeflow train` writes embeddings: the server, or the in-process shards. A
    fresh in-process shard never collides with the running candidates service."""
    hnsw = Hnsw.from_config(cfg)
    if cfg.qdrant_url:
        return ServerStore(server_client(cfg), cfg.qdrant_shards, cfg.qdrant_replicas, hnsw)
    cfg.qdrant_path.mkdir(parents=True, exist_ok=True)  # an unwritable home fails here
    return EdgeStore(cfg.qdrant_path, hnsw)


def write_embeddings(
    store: Store,
    rds: SyncClient,
    ids: np.ndarray,
    vectors: np.ndarray,
    version: str,
    on_batch: Callable[[int], object] | None = None,
) -> str:
    """Write one vector per member (with an embedding) into a fresh collection, then make it
    current. `on_batch(points)` is called after each upserted batch."""
    build = store.begin(collection_name(version), ids, vectors, on_batch)
    build.finish()
    return publish(store, rds, build.name)


def publish(store: Store, rds: SyncClient, name: str) -> str:
    """Move the pointer to the finished collection `name` (readers follow it), then delete
    what no reader needs any more."""
    previous = cast(bytes | None, rds.getset(keys.EMBEDDINGS_CURRENT, name))
    store.drop_old(name, None if previous is None else previous.decode())
    return name


def _seal(build: Path, final: Path) -> None:
    """Rename the built directory into place; a shard of the same name moves aside first
    (readers that copied it keep their copies; a copy in progress fails and is retried)."""
    if final.exists():
        aside = final.with_name(f".retired-{_HOST}-{os.getpid()}-{time.time_ns()}-{final.name}")
        final.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    build.rename(final)


def _remove_stale(directory: Path, prefix: str) -> None:
    """Delete `<prefix><pid>-...` entries left by processes of this host that are gone (the
    prefix names the host: another machine's pids mean nothing here)."""
    for path in directory.iterdir() if directory.is_dir() else ():
        if not path.name.startswith(prefix):
            continue
        pid = _pid_in(path.name[len(prefix) :])
        if pid is None or not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _pid_in(rest: str) -> int | None:
    """The pid that leads `rest` ("<pid>-..."), None if there is none."""
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_usage(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


# ---- copying a sealed shard ----------------------------------------------------------------------
def copy_shard(src: Path, dst: Path) -> int:
    """Copy a shard directory, keeping the holes of its sparse files (preallocated pages);
    returns the bytes of data copied."""
    copied = 0
    for root, _, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            copied += _copy_sparse(Path(root) / name, dst / rel / name)
    return copied


def _copy_sparse(src: Path, dst: Path) -> int:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        if not hasattr(os, "SEEK_DATA"):
            shutil.copyfileobj(fin, fout, 1 << 20)
            return size
        copied, pos = 0, 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fout.fileno(), start, end)
            copied += end - start
            pos = end
        fout.truncate(size)
        return copied


def _copy_range(fin: int, fout: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = min(end - pos, 1 << 24)
        try:
            done = os.copy_file_range(fin, fout, n, pos, pos)
        except (AttributeError, OSError):
            data = os.pread(fin, n, pos)
            done = os.pwrite(fout, data, pos)
        if done <= 0:
            raise OSError(f"copy stalled at byte {pos}")
        pos += done


# ---- reading in process ------------------------------------------------------------------------
def read_marker(sealed: Path) -> dict[str, Any]:
    """What a sealed shard holds; ShardUnavailable (naming the path) if it is not one."""
    marker = sealed / MARKER
    try:
        data = json.loads(marker.read_text())
    except FileNotFoundError:
        if not sealed.exists():
            raise ShardUnavailable(
                f"embedding shard {sealed} is missing: run `edgeflow train` again"
            ) from None
        raise ShardUnavailable(
            f"embedding shard {sealed} is incomplete ({MARKER} is missing): run "
            "`edgeflow train` again"
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardUnavailable(f"embedding shard {sealed} is unreadable: {marker}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("points"), int):
        raise ShardUnavailable(f"embedding shard {sealed} is unreadable: {marker} is not valid")
    return data


class ReplicaClosed(RuntimeError):
    """The replica was retired and closed before this search started."""


class EdgeReplica:
    """A reading process's own copy of a sealed shard, searched by HNSW.

    `nearest` may run on several threads at once; `close` waits for none of them: the shard
    closes when the last search in progress ends."""

    def __init__(
        self,
        name: str,
        shard: qe.EdgeShard,
        path: Path,
        marker: dict[str, Any],
        hnsw: Hnsw,
    ) -> None:
        self.name, self.path, self.marker, self.hnsw = name, path, marker, hnsw
        self.build = str(marker.get("build", ""))
        self.points = int(marker["points"])
        self.quantized = marker.get("quantization") == "int8"
        self._shard: qe.EdgeShard | None = shard
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False

    @classmethod
    def open(cls, root: Path, name: str, hnsw: Hnsw = Hnsw()) -> EdgeReplica:
        """Copy `root/shards/<name>` to this process's `root/readers/<pid>-<name>` and open
        it. ShardUnavailable names the sealed shard when it is missing or corrupt."""
        sealed = root / "shards" / name
        marker = read_marker(sealed)
        readers = root / "readers"
        readers.mkdir(parents=True, exist_ok=True)
        _remove_stale(readers, f"{_HOST}-")
        private = readers / f"{_HOST}-{os.getpid()}-{next(_COPIES)}-{name}"
        shutil.rmtree(private, ignore_errors=True)
        try:
            copy_shard(sealed, private)
            if read_marker(private).get("build") != marker.get("build"):
                raise ShardUnavailable(
                    f"embedding shard {sealed} was replaced while it was being copied"
                )
            shard = qe.EdgeShard.load(str(private))
        except ShardUnavailable:
            shutil.rmtree(private, ignore_errors=True)
            raise
        except FileNotFoundError as exc:
            shutil.rmtree(private, ignore_errors=True)
            raise ShardUnavailable(
                f"embedding shard {sealed} disappeared while it was being copied: {exc}"
            ) from exc
        except Exception as exc:  # the engine's own error types
            shutil.rmtree(private, ignore_errors=True)
            raise ShardUnavailable(f"embedding shard {sealed} is unreadable: {exc}") from exc
        try:
            problem = _verify(shard, marker)
        except Exception as exc:  # the engine's own error types
            problem = f"unreadable: {exc}"
        if problem:
            with contextlib.suppress(Exception):
                shard.close()
            shutil.rmtree(private, ignore_errors=True)
            raise ShardUnavailable(f"embedding shard {sealed} is {problem}")
        return cls(name, shard, private, marker, hnsw)

    def search_params(self, fetch: int) -> qe.SearchParams:
        quantization = (
            qe.QuantizationSearchParams(rescore=True, oversampling=self.hnsw.oversampling)
            if self.quantized
            else None
        )
        return qe.SearchParams(hnsw_ef=max(self.hnsw.ef, fetch), quantization=quantization)

    @contextlib.contextmanager
    def _use(self) -> Any:
        with self._lock:
            if self._shard is None or self._retired:
                raise ReplicaClosed(f"embedding replica {self.name} is closed")
            self._users += 1
            shard = self._shard
        try:
            yield shard
        finally:
            with self._lock:
                self._users -= 1
                if self._retired and self._users == 0:
                    self._close_now()

    def vector(self, member: int) -> list[float] | None:
        with self._use() as shard:
            return _vector_of(shard, member)

    def nearest(
        self, member: int, limit: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `limit` members nearest to `member` by cosine, best first, never one of the
        ids in `exclude` (sorted; it holds the member itself). Empty when the member has no
        vector. The excluded ids are dropped after retrieving `limit + len(exclude)`: in
        benchmarks/ebr_engines.py that costs what a must_not HasId filter inside the HNSW
        search costs (0.34 ms at 1M members) and keeps more of the exact top 100 (0.995
        against 0.985), since the filter prunes the graph walk."""
        with self._use() as shard:
            vector = _vector_of(shard, member)
            if vector is None:
                return _EMPTY_IDS, _EMPTY_SCORES
            fetch = min(limit + int(exclude.size), self.points)
            if fetch <= 0:
                return _EMPTY_IDS, _EMPTY_SCORES
            found = shard.query(
                qe.QueryRequest(
                    limit=fetch,
                    query=qe.Query.Nearest(vector),
                    params=self.search_params(fetch),
                    with_vector=False,
                    with_payload=False,
                )
            )
        n = len(found)
        ids = np.fromiter((cast(int, p.id) for p in found), dtype=np.int64, count=n)
        scores = np.fromiter((p.score for p in found), dtype=np.float32, count=n)
        if exclude.size:
            pos = np.minimum(np.searchsorted(exclude, ids), exclude.size - 1)
            keep = exclude[pos] != ids
            ids, scores = ids[keep], scores[keep]
        return ids[:limit], scores[:limit]

    @property
    def shard(self) -> qe.EdgeShard:
        """The open shard (benchmarks query it directly)."""
        if self._shard is None:
            raise ReplicaClosed(f"embedding replica {self.name} is closed")
        return self._shard

    def close(self) -> None:
        """Retire: close now if no search is running, else when the last one ends."""
        with self._lock:
            self._retired = True
            if self._users == 0:
                self._close_now()

    def _close_now(self) -> None:
        shard, self._shard = self._shard, None
        if shard is not None:
            try:
                shard.close()
            except Exception as exc:  # closing must not fail a search
                log.warning("closing embedding replica %s: %s", self.path, exc)
            shutil.rmtree(self.path, ignore_errors=True)


def _verify(shard: qe.EdgeShard, marker: dict[str, Any]) -> str:
    """Why a loaded shard cannot serve what its marker says it holds ("" if it can): its
    point count, and the probe point (the first one written) found with its own vector."""
    held = shard.info().points_count
    if held != marker["points"]:
        return f"corrupt: it holds {held} points, {MARKER} says {marker['points']}"
    probe = marker.get("probe")
    if not isinstance(probe, int):
        return ""
    vector = _vector_of(shard, probe)
    if vector is None or len(vector) != marker.get("dim") or not np.all(np.isfinite(vector)):
        return f"corrupt: point {probe} has no readable vector"
    found = shard.query(
        qe.QueryRequest(limit=1, query=qe.Query.Nearest(vector), params=qe.SearchParams(exact=True))
    )
    if not found or found[0].score < 1 - 1e-3:  # itself, or a twin (cosine 1)
        return f"corrupt: a search for point {probe}'s own vector does not find it"
    return ""


def _vector_of(shard: qe.EdgeShard, member: int) -> list[float] | None:
    if member < 0:  # point ids are unsigned
        return None
    found = shard.retrieve([member], with_payload=False, with_vector=True)
    if not found:
        return None
    vector: Any = found[0].vector
    if isinstance(vector, dict):
        vector = vector.get("")
    if not isinstance(vector, list) or not vector or isinstance(vector[0], list):
        return None
    return cast(list[float], vector)
