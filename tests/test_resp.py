"""Hand-encoded pipelines against a real Redis: replies, error replies, Redis going away."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.resp import RawPipeline, RespError, RespReplyError, encode


async def test_pipeline_replies_in_order(redis_proc: RedisProcess, redis_client: object) -> None:
    pipe = RawPipeline(redis_proc.url)
    try:
        payload = b"".join(
            [encode(b"SET", b"k1", b"v1"), encode(b"HSET", b"h", b"f", b"x"),
             encode(b"GET", b"k1"), encode(b"HMGET", b"h", b"f", b"nope"), encode(b"GET", b"zz")]
        )  # fmt: skip
        assert await pipe.execute(payload, 5) == [b"OK", 1, b"v1", [b"x", None], None]
        big = b"".join(encode(b"GET", b"k1") for _ in range(5000))
        assert await pipe.execute(big, 5000) == [b"v1"] * 5000
    finally:
        await pipe.close()


async def test_error_reply_is_named(redis_proc: RedisProcess, redis_client: object) -> None:
    pipe = RawPipeline(redis_proc.url)
    try:
        await pipe.execute(encode(b"SET", b"s", b"1"), 1)
        with pytest.raises(RespReplyError, match="WRONGTYPE"):
            await pipe.execute(encode(b"HMGET", b"s", b"f"), 1)
        assert await pipe.execute(encode(b"GET", b"s"), 1) == [b"1"]  # still usable
    finally:
        await pipe.close()


async def test_redis_going_away_then_coming_back(tmp_path: Path) -> None:
    proc = start_redis(tmp_path / "r")
    pipe = RawPipeline(proc.url)
    try:
        assert await pipe.execute(encode(b"PING"), 1) == [b"PONG"]
        proc.stop()
        with pytest.raises(RespError, match=f"127.0.0.1:{proc.port}"):
            await pipe.execute(encode(b"PING"), 1)
        with pytest.raises(RespError):  # refused, not hanging
            await pipe.execute(encode(b"PING"), 1)
        proc = start_redis(tmp_path / "r", port=proc.port)
        assert await pipe.execute(encode(b"PING"), 1) == [b"PONG"]
    finally:
        await pipe.close()
        proc.stop()


async def test_database_from_url(redis_proc: RedisProcess, redis_client: redis.Redis) -> None:
    pipe = RawPipeline(redis_proc.url.rsplit("/", 1)[0] + "/3")
    try:
        await pipe.execute(encode(b"SET", b"in-db-3", b"yes"), 1)
    finally:
        await pipe.close()
    assert redis_client.get("in-db-3") is None
    assert redis.Redis(port=redis_proc.port, db=3).get("in-db-3") == b"yes"
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        RawPipeline("rediss://127.0.0.1:6380/0")
