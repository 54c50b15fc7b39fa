"""Feast pushes, run in a child process of the features service.

Importing Feast takes seconds of CPU and every push runs pandas and protobuf code under the
GIL. In the service's own process that starved the event loop: GetFeatures calls queued
behind the first nearline push missed their 60 ms deadlines. The child imports Feast on its
first push and keeps the FeatureStore; the service only waits for its answer.

The child is the service's to kill: one that has not answered a push for PUSH_DEADLINE_S is
killed and another started, and so is one that died. The rendered Feast repo gives Feast's
Redis client short timeouts, but a repo edited by hand, or a stall inside Feast, must not
hold every later push for good.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import threading
import time
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import redis

from edgeflow.features.schema import EMBEDDING_FEATURE, JOIN_KEY, PUSH_SOURCE, SCALAR_FEATURES
from edgeflow.shell.errors import RequestError

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

log = logging.getLogger("edgeflow.features")

# Long enough for a first push that imports Feast on a busy machine.
PUSH_DEADLINE_S = 60.0
_stores: dict[str, FeatureStore] = {}  # in the child: repo path -> Feast's SDK over it


class FeastWriter:
    """Writes whole rows through Feast's push source from one child process, one push at a
    time; each push is numbered, so an answer to a push whose caller gave up is skipped."""

    def __init__(self, repo: Path, redis_url: str, deadline_s: float = PUSH_DEADLINE_S) -> None:
        self._repo, self._redis_url, self.deadline_s = repo, redis_url, deadline_s
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._seq = 0
        self._sent: dict[int, float] = {}  # pushes not answered yet: number -> when sent
        self._lock = asyncio.Lock()  # one reader of the pipe at a time

    async def push(
        self, entities: np.ndarray, scalars: np.ndarray, embeddings: np.ndarray, now: datetime
    ) -> None:
        if not (self._repo / "feature_store.yaml").is_file():  # say so now, not after a spawn
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"push: no Feast repo at {self._repo}: run `edgeflow train` to publish features",
            )
        async with self._lock:
            conn = self._ready()
            self._seq += 1
            seq = self._seq
            self._sent[seq] = time.monotonic()
            await self._send(conn, (seq, str(self._repo), entities, scalars, embeddings, now))
            error = await self._answer(conn, seq)
        if error is not None:
            raise self._request_error(error)

    def _ready(self) -> Connection:
        """The child's end of the pipe: a new child if there is none, or if the one there
        died or has left a push unanswered past the deadline."""
        if self._sent and time.monotonic() - min(self._sent.values()) > self.deadline_s:
            log.warning("the Feast writer left a push unanswered for %.0fs: restarting it",
                        self.deadline_s)  # fmt: skip
            self._stop()
        if self._proc is None or self._conn is None or not self._proc.is_alive():
            self._stop()
            # spawn, not fork: the service's gRPC and Redis threads must not be copied.
            context = multiprocessing.get_context("spawn")
            ours, theirs = context.Pipe()
            proc = context.Process(target=_serve, args=(theirs, os.getpid()),
                                   name="feast-writer", daemon=True)  # fmt: skip
            proc.start()
            theirs.close()
            self._proc, self._conn = proc, ours
        return self._conn

    async def _send(self, conn: Connection, job: tuple[Any, ...]) -> None:
        """Off the event loop (a large push fills the pipe until the child reads it); the
        lock stays held until the bytes are out even if the caller gives up, so no other
        push's bytes mix with them."""
        sending = asyncio.ensure_future(asyncio.to_thread(conn.send, job))
        try:
            await asyncio.shield(sending)
        except asyncio.CancelledError:
            await asyncio.wait({sending}, timeout=self.deadline_s)
            if not sending.done():
                self._stop()  # the send fails with the child gone
            raise
        except OSError as exc:
            self._stop()
            raise _died() from exc

    async def _answer(self, conn: Connection, seq: int) -> BaseException | None:
        """The child's answer to push `seq`: None, or the exception it raised."""
        while True:
            left = self.deadline_s - (time.monotonic() - self._sent[seq])
            try:
                if left <= 0 or not await asyncio.to_thread(conn.poll, left):
                    self._stop()
                    raise RequestError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"push: the Feast writer did not answer within {self.deadline_s:.0f}s; "
                        "it was restarted, retry",
                    )
                got, error = conn.recv()
            except (EOFError, OSError) as exc:  # it died: poll reports its end closed
                self._stop()
                raise _died() from exc
            self._sent.pop(got, None)
            if got == seq:
                return error if isinstance(error, BaseException) else None

    def _request_error(self, error: BaseException) -> RequestError:
        if isinstance(error, FileNotFoundError):
            return RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"push: {error}")
        if isinstance(error, (redis.ResponseError, ValueError, KeyError)):
            return RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"push: Feast rejected the rows: {error}"
            )
        if isinstance(error, (redis.RedisError, OSError)):
            return RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"push: Redis at {self._redis_url} is unavailable: {error}",
            )
        return RequestError(grpc.StatusCode.INTERNAL, f"push: Feast failed: {error!r}")

    def _stop(self, wait_s: float = 0.0) -> None:
        """Close the child's pipe, so that it exits on its own (Feast removes its metrics
        directory at exit) within `wait_s`, else kill it."""
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None and self._proc.is_alive():
            self._proc.join(timeout=wait_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._proc, self._conn = None, None
        self._sent.clear()

    def close(self) -> None:
        self._stop(wait_s=2.0)


def _died() -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, "push: the Feast writer process died; retry")


def _serve(conn: Connection, parent: int) -> None:
    """The child: answer each push with (its number, None or the exception it raised), until
    the service closes its end or is gone."""
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    _exit_with(parent, jobs)

    def read() -> None:  # always draining the pipe, so the service's sends never wait long
        while True:
            try:
                jobs.put(conn.recv())
            except (EOFError, OSError):  # the service closed its end
                jobs.put(None)
                return

    threading.Thread(target=read, name="push-reader", daemon=True).start()
    while (item := jobs.get()) is not None:
        seq, *job = item
        error: Any = None
        try:
            _push(*job)
        except Exception as exc:
            error = exc
        try:
            try:
                conn.send((seq, error))
            except OSError:
                raise
            except Exception:  # an exception that does not pickle: its text
                conn.send((seq, RuntimeError(repr(error))))
        except OSError:  # the service closed its end or is gone
            return


def _exit_with(parent: int, jobs: queue.SimpleQueue[Any]) -> None:
    """In the child: exit once the service is gone, even if it was killed (an orphan would
    hold Feast's few hundred MB for good): after the push in hand, or at once if that hangs."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        jobs.put(None)
        time.sleep(10.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _push(
    repo: str, entities: np.ndarray, scalars: np.ndarray, embeddings: np.ndarray, now: datetime
) -> None:
    """In the child: Feast's push of the rows, online only."""
    from edgeflow.build.feast_features import feature_store_at

    store = _stores.get(repo)
    if store is None:
        store = _stores[repo] = feature_store_at(Path(repo))
    from feast.data_source import PushMode

    store.push(PUSH_SOURCE, push_frame(entities, scalars, embeddings, now), to=PushMode.ONLINE)


def push_frame(
    entities: np.ndarray, scalars: np.ndarray, embeddings: np.ndarray, now: datetime
) -> pd.DataFrame:
    """The DataFrame Feast's push takes: every feature of the view plus timestamps."""
    import pandas as pd

    frame = pd.DataFrame({JOIN_KEY: entities})
    for j, name in enumerate(SCALAR_FEATURES):
        frame[name] = scalars[:, j].astype(np.float32)
    frame[EMBEDDING_FEATURE] = list(embeddings.astype(np.float32))
    frame["event_timestamp"] = now
    frame["created"] = now
    return frame
