"""The nearline worker: a consumer in the `nearline` group of the member-event stream.

For each batch of events it updates the graph (an edge-state delta per pair, read from the
adjacency SETs that Publish changed, so replays and reordering converge on the truth), pushes
the changed features through the features service's Push (Feast's push source), recomputes
the affected members' lists with the offline batch runner for every workflow whose nearline
mode listens to the event, and stores them with `lists.update_lists`. Only then are the
events marked done and acknowledged, in one script: delivery is at least once, and an event
id marked done is never applied twice. Each worker holds a lease it renews; when a worker's
lease lapses (it died), another claims its pending entries at once and removes it from the
group, and entries pending past NEARLINE_CLAIM_IDLE_S are claimed whoever holds them
(XAUTOCLAIM). The gRPC server carries health only: SERVING once the consumer group exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import numpy as np
import redis

from edgeflow import tensor
from edgeflow.candidates.sources import Reader, VectorIndex
from edgeflow.config import Config
from edgeflow.features.compute import LOCAL_FEATURES, local_member_features
from edgeflow.features.schema import SCALAR_FEATURES
from edgeflow.graph import Graph
from edgeflow.nearline.events import GRAPH_TYPES, Event, from_fields
from edgeflow.offline.context import live_collection
from edgeflow.offline.executor import BatchRunner, OfflineError
from edgeflow.offline.inputs import EXACT_EBR_MAX, Inputs, LiveFeatures, embedding_index
from edgeflow.scoring.registry import ModelRegistry
from edgeflow.shell import metrics, tls
from edgeflow.shell.server import Service, sync_channel
from edgeflow.stores import keys, lists
from edgeflow.stores.graph_store import (
    append_deltas,
    compact_graph,
    load_graph,
    read_deltas,
    snapshot_of,
)
from edgeflow.stores.redis_client import SyncClient, connect, script
from edgeflow.v1 import features_pb2, features_pb2_grpc
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.modes import list_name
from edgeflow.workflow.validate import load_directory

log = logging.getLogger("edgeflow.nearline")

READ_COUNT = 64
BLOCK_MS = 500
TAKEOVER_EVERY_S = 1.0
# A delta stream this long is folded into a new graph snapshot.
COMPACT_DELTAS = 10_000
DONE_TTL_S = 7 * 24 * 3600
PUSH_TIMEOUT_S = 10.0
_RETRY_S = 1.0
BACKLOG_EVERY_S = 1.0
# Push failures that will not heal by retrying the same event.
_PERMANENT = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)

# KEYS = stream, stats, then a done key per (entry id, event id) pair; ARGV = group, done
# TTL, channel, payload, then the pairs. Marks each event done (counting only the first
# time), acks its entry and announces the stored lists. Every key carries {events}.
_FINISH_LUA = """
local applied = 0
for i = 3, #KEYS do
  local a = 5 + (i - 3) * 2
  if ARGV[a + 1] ~= '' and redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    applied = applied + 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[a])
end
if applied > 0 then redis.call('HINCRBY', KEYS[2], 'applied', applied) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return applied
"""

_Entry = tuple[bytes, dict[bytes, bytes] | None]


class PushFailed(RuntimeError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BatchOutcome:
    applied: list[Event] = field(default_factory=list)
    dead: list[tuple[bytes, str]] = field(default_factory=list)  # entry id, reason
    lists: dict[str, int] = field(default_factory=dict)  # list -> members stored


class Processor:
    """Applies batches of events; blocking (Redis, gRPC and numpy), run on the worker thread."""

    def __init__(self, cfg: Config, client: SyncClient, consumer: str) -> None:
        self.cfg = cfg
        self.client = client
        self.consumer = consumer
        self.registry = ModelRegistry(cfg.model_dir)
        self.workflows: list[Workflow] = []
        self.runners: dict[str, BatchRunner] = {}
        self.graph: Graph | None = None
        self.inputs: Inputs | None = None
        self._embeddings: bytes | None = None
        self._stamp: tuple[tuple[str, float], ...] = ()
        self._refreshed = 0.0
        self._features = LiveFeatures(client)
        tls_files = tls.load(cfg.tls_dir)
        self._renewal = tls.Renewal(tls_files)  # a renewed certificate: a new channel
        self._channel = sync_channel(cfg.features_addr, tls_files)
        self._push = features_pb2_grpc.FeatureServiceStub(self._channel)
        self._no_list: set[str] = set()

    def close(self) -> None:
        self._channel.close()
        if self.inputs is not None:
            self.inputs.close()

    def _renew_channel(self) -> None:
        files = self._renewal.check()
        if files is not None:  # no call is in flight: this worker pushes one at a time
            old, self._channel = self._channel, sync_channel(self.cfg.features_addr, files)
            self._push = features_pb2_grpc.FeatureServiceStub(self._channel)
            old.close()

    # ---- what it computes with ----------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Workflows and models, at most once per reload interval."""
        now = time.monotonic()
        if not force and now - self._refreshed < self.cfg.reload_interval_s:
            return
        self._refreshed = now
        for problem in self.registry.refresh():
            log.warning("model registry: %s", problem)
        directory = self.cfg.workflows_dir
        files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
        stamp = tuple((str(p), p.stat().st_mtime) for p in files)
        if stamp != self._stamp:
            workflows, errors = load_directory(directory)
            for err in errors:
                log.error("workflow rejected: %s", err)
            self.workflows = [w for w in workflows.values() if w.spec.modes.nearline]
            self.runners = {}
            self._stamp = stamp
            log.info("nearline workflows: %s", [w.name for w in self.workflows])

    def sync_graph(self) -> bool:
        """Follow the graph pointer and its deltas; True when a graph is loaded."""
        current = cast(bytes | None, self.client.get(keys.GRAPH_CURRENT))
        if current is None:
            if self.inputs is not None:
                self.inputs.close()
            self.graph = self.inputs = None
            return False
        graph = self.graph
        if graph is None or snapshot_of(graph) != current.decode():
            graph = load_graph(self.client, cache_dir=self.cfg.graph_dir)
        else:
            graph = read_deltas(self.client, graph)
        embeddings = cast(bytes | None, self.client.get(keys.EMBEDDINGS_CURRENT))
        if graph is not self.graph or self.inputs is None or embeddings != self._embeddings:
            rebuild = (
                self.inputs is None
                or embeddings != self._embeddings
                or (self.graph is None or snapshot_of(self.graph) != snapshot_of(graph))
            )
            old = self.inputs
            if rebuild or old is None:
                index, ann = self._embedding_search(graph)
            else:
                index, ann = old.index, old.ann
            if old is not None and old.ann is not ann:
                old.close()
            self.graph, self._embeddings = graph, embeddings
            self.inputs = Inputs.build(
                graph, self._features, self.registry, self.client, index, ann
            )
            for runner in self.runners.values():
                runner.inputs = self.inputs
        return True

    def _embedding_search(self, graph: Graph) -> tuple[VectorIndex | None, Reader | None]:
        """The exact index of every member's embedding from Feast's rows, or, past
        EXACT_EBR_MAX members, the live HNSW collection the candidates service searches
        (reading a million rows again on each change would stall the stream)."""
        if graph.n > EXACT_EBR_MAX:
            ann = live_collection(self.cfg, self.client)
            if ann is not None:
                return None, ann
        return embedding_index(self._features, graph.ids), None

    def rebuild_index(self) -> None:
        """After an embedding push: the exact index reads the rows again; the HNSW
        collection changes only when training publishes a new one."""
        if self.inputs is not None and self.graph is not None and self.inputs.ann is None:
            self.inputs.index = embedding_index(self._features, self.graph.ids)

    def runner(self, wf: Workflow) -> BatchRunner:
        assert self.inputs is not None
        runner = self.runners.get(wf.name)
        if runner is None:  # member by member: the graph changes with every batch
            runner = self.runners[wf.name] = BatchRunner(wf, self.inputs, per_member=True)
        return runner

    # ---- one batch ------------------------------------------------------------------------
    def handle(self, entries: Sequence[_Entry]) -> BatchOutcome:
        """Apply a batch of stream entries and acknowledge them; raises (acknowledging
        nothing) when a store is unavailable, so the entries are retried."""
        outcome = BatchOutcome()
        parsed: list[tuple[bytes, Event]] = []
        acks: list[tuple[bytes, str]] = []
        for entry_id, fields in entries:
            if fields is None:  # trimmed from the stream before it was read
                acks.append((entry_id, ""))
                continue
            try:
                parsed.append((entry_id, from_fields(fields)))
            except (KeyError, ValueError) as exc:
                outcome.dead.append((entry_id, f"malformed entry: {exc}"))
        pipe = self.client.pipeline(transaction=False)
        for _, event in parsed:
            pipe.exists(keys.event_done(event.id))
        seen = pipe.execute() if parsed else []
        todo = [(eid, ev) for (eid, ev), done in zip(parsed, seen, strict=True) if not done]
        acks += [(eid, "") for (eid, _), done in zip(parsed, seen, strict=True) if done]
        if todo:
            outcome = self._apply(todo, outcome)
        self._dead_letter(outcome.dead, dict(entries))
        acks += [(eid, ev.id) for eid, ev in todo if ev in outcome.applied]
        acks += [(eid, "") for eid, _ in outcome.dead]
        self._finish(acks, outcome)
        _observe(outcome, duplicates=len(parsed) - len(todo))
        return outcome

    def _apply(self, todo: list[tuple[bytes, Event]], outcome: BatchOutcome) -> BatchOutcome:
        events = [ev for _, ev in todo]
        self.refresh()
        edges = [ev for ev in events if ev.type in GRAPH_TYPES]
        if edges:
            pairs = np.asarray([(ev.member, ev.target) for ev in edges], dtype=np.int64)
            pipe = self.client.pipeline(transaction=False)
            for u, v in pairs.tolist():
                pipe.sismember(keys.adjacency(u), v)
            truth = np.asarray(pipe.execute(), dtype=bool)
            append_deltas(self.client, pairs, truth)  # a no-op without a graph
        has_graph = self.sync_graph()  # with these deltas and any other worker's
        bad = self._push_features(events, edges, has_graph)
        for ev in events:
            if ev.id in bad:
                outcome.dead.append((next(e for e, x in todo if x is ev), bad[ev.id]))
            else:
                outcome.applied.append(ev)
        if has_graph:
            self._recompute(outcome)
        if edges and has_graph:
            compact_graph(self.client, COMPACT_DELTAS, self.cfg.graph_dir)
        return outcome

    def _push_features(
        self, events: list[Event], edges: list[Event], has_graph: bool
    ) -> dict[str, str]:
        """Push changed features; returns the events refused for good (id -> reason)."""
        refused: dict[str, str] = {}
        if edges and has_graph and self.graph is not None:
            touched = np.unique(np.asarray([m for ev in edges for m in ev.affected()]))
            have = ~self._features.rows(touched).missing  # a push needs an existing row
            members, values = local_member_features(self.graph, touched[have])
            if members.size:
                try:
                    self._push_rows(members, values, LOCAL_FEATURES)
                except PushFailed as exc:
                    if exc.code not in _PERMANENT:
                        raise
                    log.warning("graph features not pushed: %s", exc)
        embedding_changed = False
        for ev in events:
            if ev.type != "profile_change":
                continue
            columns = tuple(sorted(ev.features))
            values = np.asarray([[ev.features[c] for c in columns]], dtype=np.float32)
            try:
                self._push_rows(np.asarray([ev.member]), values, columns)
            except PushFailed as exc:
                if exc.code not in _PERMANENT:
                    raise
                refused[ev.id] = f"push refused: {exc}"
                continue
            embedding_changed |= any(c not in SCALAR_FEATURES for c in columns)
        if embedding_changed:
            self.rebuild_index()
        return refused

    def _push_rows(self, members: np.ndarray, values: np.ndarray, columns: Sequence[str]) -> None:
        request = features_pb2.PushRequest(
            entities=np.asarray(members, dtype=np.int64).tolist(),
            values=tensor.pack(values, tuple(columns)),
        )
        try:
            self._renew_channel()
            self._push.Push(request, timeout=PUSH_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = cast(grpc.Call, exc).code()
            details = cast(grpc.Call, exc).details()
            raise PushFailed(
                code, f"features service at {self.cfg.features_addr}: {code.name}: {details}"
            ) from None

    def _recompute(self, outcome: BatchOutcome) -> None:
        for wf in self.workflows:
            nearline = wf.spec.modes.nearline
            assert nearline is not None
            members = sorted(
                {m for ev in outcome.applied if ev.type in nearline.events for m in ev.affected()}
            )
            if not members:
                continue
            name = list_name(wf)
            try:
                result = self.runner(wf).run(np.asarray(members, dtype=np.int64))
            except OfflineError as exc:
                log.error("workflow %s: %s", wf.name, exc)
                continue
            version = lists.update_lists(self.client, name, result.members, result.lists)
            if version is None:
                if name not in self._no_list:
                    log.warning(
                        "list %s has no live version yet: run `edgeflow offline run "
                        "--workflow %s` first",
                        name,
                        wf.name,
                    )
                    self._no_list.add(name)
                continue
            self._no_list.discard(name)
            outcome.lists[name] = len(members)

    def _dead_letter(
        self, dead: list[tuple[bytes, str]], fields: dict[bytes, dict[bytes, bytes] | None]
    ) -> None:
        if not dead:
            return
        pipe = self.client.pipeline(transaction=False)
        for entry_id, reason in dead:
            body: dict[Any, Any] = dict(fields.get(entry_id) or {})
            pipe.xadd(
                keys.EVENTS_DEAD,
                {**body, b"entry": entry_id, b"reason": reason.encode()},
                maxlen=100_000,
                approximate=True,
            )
            log.error("event entry %s dead-lettered: %s", entry_id.decode(), reason)
        pipe.hincrby(keys.NEARLINE_STATS, "dead", len(dead))
        pipe.execute()

    def _finish(self, acks: list[tuple[bytes, str]], outcome: BatchOutcome) -> None:
        if not acks:
            return
        payload = json.dumps(
            {
                "events": [ev.id for ev in outcome.applied],
                "lists": outcome.lists,
                "stored_at": time.time(),
            }
        )
        args: list[Any] = [keys.NEARLINE_GROUP, DONE_TTL_S, keys.NEARLINE_STORED, payload]
        done_keys = [keys.EVENTS, keys.NEARLINE_STATS]
        for entry_id, event_id in acks:
            args += [entry_id, event_id]
            done_keys.append(keys.event_done(event_id))
        script(self.client, _FINISH_LUA)(keys=done_keys, args=args)


def _observe(outcome: BatchOutcome, duplicates: int) -> None:
    """Lag from each applied event's time to now (its changes are stored), and outcomes."""
    now = time.time()
    for ev in outcome.applied:
        metrics.NEARLINE_LAG.observe(max(0.0, now - ev.time))
    for outcome_name, n in (("applied", len(outcome.applied)), ("duplicate", duplicates),
                            ("dead", len(outcome.dead))):  # fmt: skip
        if n:
            metrics.NEARLINE_EVENTS.labels(outcome_name).inc(n)


def backlog(client: SyncClient) -> int | None:
    """Entries of the event stream the group has not acknowledged: pending, plus those not
    yet delivered where Redis (7+) reports the group's lag."""
    for group in cast(list[dict[str, Any]], client.xinfo_groups(keys.EVENTS)):
        name = group.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == keys.NEARLINE_GROUP:
            return int(group.get("pending") or 0) + int(group.get("lag") or 0)
    return None


def ensure_group(client: SyncClient) -> None:
    """The consumer group, created at the start of the stream (so no event is skipped)."""
    try:
        client.xgroup_create(keys.EVENTS, keys.NEARLINE_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class NearlineWorker(Service):
    name = "nearline"
    service_names: tuple[str, ...] = ()

    def __init__(
        self, cfg: Config, consumer: str | None = None, claim_idle_s: float | None = None
    ) -> None:
        self.cfg = cfg
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_s = cfg.nearline_claim_idle_s if claim_idle_s is None else claim_idle_s
        self.lease_s = cfg.nearline_lease_s
        self.client = connect(cfg.redis_url, socket_timeout_s=10.0)
        self.processor = Processor(cfg, self.client, self.consumer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease_thread: threading.Thread | None = None
        self.batches = 0

    def register(self, server: grpc.aio.Server) -> None:
        """Health and reflection only: the worker serves no API."""

    async def start(self) -> None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")  # small products: spinning BLAS threads
        while True:
            try:
                await asyncio.to_thread(ensure_group, self.client)
                break
            except (redis.RedisError, OSError) as exc:
                log.warning("consumer group not ready, Redis at %s: %s", self.cfg.redis_url, exc)
                await asyncio.sleep(_RETRY_S)
        try:
            await asyncio.to_thread(self.processor.refresh, True)
        except (redis.RedisError, OSError) as exc:
            log.warning("not loaded yet: %s", exc)
        self._lease_thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._lease_thread.start()
        self._thread = threading.Thread(target=self._run, name="nearline", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._lease_thread):
            if thread is not None:
                await asyncio.to_thread(thread.join, 10.0)
        try:  # leave the group tidy: no lease, and no consumer entry when nothing is pending
            await asyncio.to_thread(self._leave)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not leave the consumer group: %s", exc)
        self.processor.close()
        self.client.close()

    # ---- liveness: the lease, and taking over from dead workers -------------------------
    def _renew(self) -> None:
        lease_ms = int(self.lease_s * 1000)
        while not self._stop.is_set():
            try:
                self.client.set(keys.nearline_lease(self.consumer), "1", px=lease_ms)
            except (redis.RedisError, OSError) as exc:
                log.warning("lease not renewed: %s", exc)
            self._stop.wait(self.lease_s / 3)

    def _leave(self) -> None:
        self.client.delete(keys.nearline_lease(self.consumer))
        if not self._pending_of(self.consumer):
            self.client.xgroup_delconsumer(keys.EVENTS, keys.NEARLINE_GROUP, self.consumer)

    def _pending_of(self, consumer: str) -> list[int | bytes | str | memoryview]:
        rows = self.client.xpending_range(
            keys.EVENTS, keys.NEARLINE_GROUP, min="-", max="+", count=READ_COUNT,
            consumername=consumer,
        )  # fmt: skip
        return [r["message_id"] for r in cast(list[dict[str, Any]], rows)]

    def _take_over(self) -> None:
        """Claim the pending entries of every consumer whose lease lapsed, apply them, and
        remove the consumer once it holds none. A claim resets an entry's idle time, so two
        workers taking over at once do not both claim it (min idle: half a lease)."""
        consumers = cast(
            list[dict[str, Any]], self.client.xinfo_consumers(keys.EVENTS, keys.NEARLINE_GROUP)
        )
        for c in consumers:
            raw = c["name"]
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name == self.consumer or int(c.get("idle", 0)) < self.lease_s * 1000:
                continue  # itself, or a consumer that read within a lease (live workers poll)
            if self.client.exists(keys.nearline_lease(name)):
                continue
            while not self._stop.is_set():
                ids = self._pending_of(name)
                if not ids:
                    break
                claimed = cast(list[_Entry], self.client.xclaim(
                    keys.EVENTS, keys.NEARLINE_GROUP, self.consumer,
                    min_idle_time=int(self.lease_s * 500), message_ids=ids,
                ))  # fmt: skip
                if not claimed:
                    break  # another worker took them, or they are not idle long enough yet
                log.info("took over %d events of %s (its lease lapsed)", len(claimed), name)
                self._handle(claimed)
            if not self._pending_of(name):
                self.client.xgroup_delconsumer(keys.EVENTS, keys.NEARLINE_GROUP, name)
                log.info("removed dead consumer %s", name)

    # ---- the consumer loop ---------------------------------------------------------------
    def _run(self) -> None:
        last_claim = last_backlog = last_takeover = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_takeover >= TAKEOVER_EVERY_S:
                    last_takeover = time.monotonic()
                    self._take_over()
                if time.monotonic() - last_backlog >= BACKLOG_EVERY_S:
                    last_backlog = time.monotonic()
                    pending = backlog(self.client)
                    if pending is not None:
                        metrics.NEARLINE_BACKLOG.set(pending)
                if time.monotonic() - last_claim >= min(self.claim_idle_s, 5.0):
                    last_claim = time.monotonic()
                    self._claim()
                reply = self.client.xreadgroup(
                    keys.NEARLINE_GROUP,
                    self.consumer,
                    {keys.EVENTS: ">"},
                    count=READ_COUNT,
                    block=BLOCK_MS,
                )
                for _, entries in cast(list[tuple[bytes, list[_Entry]]], reply or []):
                    if entries:
                        self._handle(entries)
                self.processor.refresh()
            except (redis.RedisError, OSError, PushFailed) as exc:
                log.warning("nearline batch not done (retried): %s", exc)
                self._stop.wait(_RETRY_S)
            except Exception:
                log.exception("nearline batch failed (retried)")
                self._stop.wait(_RETRY_S)

    def _claim(self) -> None:
        """Take over entries idle past claim_idle_s (a dead worker's, or this one's failures)."""
        start = "0-0"
        idle_ms = int(self.claim_idle_s * 1000)
        while not self._stop.is_set():
            reply = cast(
                list[Any],
                self.client.xautoclaim(
                    keys.EVENTS,
                    keys.NEARLINE_GROUP,
                    self.consumer,
                    idle_ms,
                    start_id=start,
                    count=READ_COUNT,
                ),
            )
            start = bytes(reply[0]).decode()
            entries = cast(list[_Entry], reply[1])
            if entries:
                log.info("claimed %d idle event entries", len(entries))
                self._handle(entries)
            if start == "0-0" or not entries:
                return

    def _handle(self, entries: Iterable[_Entry]) -> None:
        self.processor.handle(list(entries))
        self.batches += 1


def create(cfg: Config) -> Service:
    return NearlineWorker(cfg)
