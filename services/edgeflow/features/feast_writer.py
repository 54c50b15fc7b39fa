"""Feast pushes, run in a child process of the features service.

Importing Feast takes seconds of CPU and every push runs pandas and protobuf code under the
GIL. In the service's own process that starved the event loop: GetFeatures calls queued
behind the first nearline push missed their 60 ms deadlines. The child imports Feast on its
first push and keeps the FeatureStore; the service only awaits the result.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import redis

from edgeflow.features.schema import EMBEDDING_FEATURE, JOIN_KEY, PUSH_SOURCE, SCALAR_FEATURES
from edgeflow.shell.errors import RequestError

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

_stores: dict[str, FeatureStore] = {}  # in the child: repo path -> Feast's SDK over it


class FeastWriter:
    """Writes whole rows through Feast's push source from one child process."""

    def __init__(self, repo: Path, redis_url: str) -> None:
        self._repo, self._redis_url = repo, redis_url
        self._pool: ProcessPoolExecutor | None = None

    async def push(
        self, entities: np.ndarray, scalars: np.ndarray, embeddings: np.ndarray, now: datetime
    ) -> None:
        if not (self._repo / "feature_store.yaml").is_file():  # say so now, not after a spawn
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"push: no Feast repo at {self._repo}: run `edgeflow train` to publish features",
            )
        if self._pool is None:
            # spawn, not fork: the service's gRPC and Redis threads must not be copied.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
            )
        loop = asyncio.get_running_loop()
        args = (str(self._repo), entities, scalars, embeddings, now)
        try:
            await loop.run_in_executor(self._pool, _push, *args)
        except BrokenProcessPool as exc:
            self._pool = None  # the next push starts a new child
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, "push: the Feast writer process died; retry"
            ) from exc
        except FileNotFoundError as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"push: {exc}") from exc
        except (redis.ResponseError, ValueError, KeyError) as exc:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"push: Feast rejected the rows: {exc}"
            ) from exc
        except (redis.RedisError, OSError) as exc:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"push: Redis at {self._redis_url} is unavailable: {exc}",
            ) from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _exit_with(parent: int) -> None:
    """In the child: exit once the service is gone, even if it was killed (an orphan would
    hold Feast's few hundred MB for good)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
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
