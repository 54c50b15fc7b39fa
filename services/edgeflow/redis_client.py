"""Redis clients with short timeouts, so Redis going away fails a call fast, never hangs it."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 2.0


def connect_async(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        retry_on_timeout=False,
        health_check_interval=0,
    )


def connect(url: str, socket_timeout_s: float = 30.0) -> redis.Redis:
    """A blocking client for the CLI and batch jobs (longer timeout for bulk writes)."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=socket_timeout_s
    )
