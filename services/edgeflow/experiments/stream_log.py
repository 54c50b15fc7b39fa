"""A Redis Stream log that never slows or fails the request that writes to it.

`put` only appends to a bounded in-memory queue; a background task writes batches with one
pipelined round trip (hand-encoded XADDs on a RawPipeline: the writer shares the gateway's
one thread with the request path, and redis-py's pipeline costs several times as much).
When the queue is full or Redis is unavailable, records are dropped and counted, never
retried on the request path. A record may carry further commands, written in the same
round trip (the gateway counts impressions beside each exposure: merging/impressions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from edgeflow.stores.resp import RawPipeline, RespReplyError, encode

log = logging.getLogger("edgeflow.experiments")

MAX_QUEUE = 10_000
MAX_BATCH = 500
# After a failed write, wait this long before the next one, so a Redis that is down is not
# hammered (records arriving meanwhile fill the queue, then are dropped and counted).
RETRY_AFTER_S = 0.5
# A batch waits this long after its first record for more: under load, one write (one
# socket send, one Redis wake-up) carries many records instead of one per request.
LINGER_S = 0.05


class StreamLog:
    def __init__(
        self,
        redis: RawPipeline,
        stream: str,
        maxlen: int,
        on_written: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[str, int], None] = lambda reason, n: None,
        max_queue: int = MAX_QUEUE,
        linger_s: float = LINGER_S,
    ) -> None:
        self._redis = redis
        self._stream = stream
        # XADD <stream> MAXLEN ~ <maxlen> * : the fixed head of every entry's command.
        self._head = (b"XADD", stream.encode(), b"MAXLEN", b"~", str(maxlen).encode(), b"*")
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._linger_s = linger_s
        # (fields, further commands encoded, how many replies they give)
        self._queue: asyncio.Queue[tuple[dict[str, str], bytes, int]] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"stream-log {self._stream}")

    def put(self, fields: dict[str, str], extra: bytes = b"", extra_replies: int = 0) -> None:
        """Queue one record, and `extra` commands (`extra_replies` replies) to send beside
        it; drops them (counted) when the queue is full."""
        try:
            self._queue.put_nowait((fields, extra, extra_replies))
        except asyncio.QueueFull:
            self._drop("queue_full", 1)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (within the timeout), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def _drop(self, reason: str, n: int) -> None:
        self.dropped += n
        self._on_dropped(reason, n)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._linger_s > 0:
                await asyncio.sleep(self._linger_s)
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except (RespReplyError, OSError) as exc:  # RespError is a ConnectionError
                self._drop("redis_unavailable", len(batch))
                log.warning("dropped %d records for %s: %s", len(batch), self._stream, exc)
                await asyncio.sleep(RETRY_AFTER_S)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[tuple[dict[str, str], bytes, int]]) -> None:
        head = self._head
        payload = b"".join(
            encode(*head, *(part.encode() for kv in fields.items() for part in kv)) + extra
            for fields, extra, _ in batch
        )
        await self._redis.execute(payload, len(batch) + sum(n for _, _, n in batch))
        self.written += len(batch)
        self._on_written(len(batch))
