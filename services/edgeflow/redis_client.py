"""Redis clients with short timeouts, so Redis going away fails a call fast, never hangs it."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 2.0
# A request-path call retries a refused connection, or a Redis still loading its data set
# (BusyLoadingError, "-LOADING"), 4 times over about 0.5 s, then fails (callers answer
# UNAVAILABLE). redis-py's own default waits up to 10 s per retry, and also retries a
# timeout, which would multiply SOCKET_TIMEOUT_S.
RETRIES = 4
RETRY_BACKOFF = ExponentialBackoff(cap=0.2, base=0.025)  # 0.05, 0.1, 0.2, 0.2 s


def connect_async(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        retry_on_timeout=False,
        retry=Retry(RETRY_BACKOFF, RETRIES, supported_errors=(redis.ConnectionError,)),
        health_check_interval=0,
    )


def connect(url: str, socket_timeout_s: float = 30.0) -> redis.Redis:
    """A blocking client for the CLI and batch jobs (longer timeout for bulk writes)."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=socket_timeout_s
    )
