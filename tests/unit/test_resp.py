"""Hand-encoded pipelines against a real Redis: replies, error replies, Redis going away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.stores.resp import FixedReply, RawPipeline, RespError, RespReplyError, encode


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


def _gets(*keys: bytes) -> bytes:
    return b"".join(encode(b"GET", k) for k in keys)


async def test_usual_replies_come_back_as_one_matrix(
    redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    """GETs of 3-byte values: a byte matrix, across many socket reads; a longer value or a
    nil anywhere (first, last: a reply shorter than the usual one) gives hiredis' replies."""
    redis_client.mset({"a": b"xyz", "b": b"uvw", "long": b"abcd"})
    framing = np.ones(9, dtype=bool)
    framing[4:7] = False
    shape = FixedReply(b"$3\r\n...\r\n", framing)
    pipe = RawPipeline(redis_proc.url)
    try:
        out = await pipe.execute_fixed(_gets(b"a", b"b"), 2, shape)
        assert isinstance(out, np.ndarray) and out.shape == (2, 9)
        assert out[:, 4:7].tobytes() == b"xyzuvw"
        many = await pipe.execute_fixed(_gets(*[b"b"] * 20_000), 20_000, shape)
        assert isinstance(many, np.ndarray) and many[:, 4:7].tobytes() == b"uvw" * 20_000
        for keys in ([b"a", b"long"], [b"nope", b"a"], [b"a"] * 5000 + [b"nope"], [b"nope"]):
            want = await pipe.execute(_gets(*keys), len(keys))
            assert await pipe.execute_fixed(_gets(*keys), len(keys), shape) == want
        assert (await pipe.execute_fixed(b"", 0, shape)).shape == (0, 9)
    finally:
        await pipe.close()


async def test_error_reply_is_named(redis_proc: RedisProcess, redis_client: object) -> None:
    pipe = RawPipeline(redis_proc.url)
    try:
        await pipe.execute(encode(b"SET", b"s", b"1"), 1)
        with pytest.raises(RespReplyError, match="WRONGTYPE"):
            await pipe.execute(encode(b"HMGET", b"s", b"f"), 1)
        assert await pipe.execute(encode(b"GET", b"s"), 1) == [b"1"]  # still usable
        usual = FixedReply(b"*1\r\n$-1\r\n", np.ones(9, dtype=bool))
        with pytest.raises(RespReplyError, match="WRONGTYPE"):
            await pipe.execute_fixed(encode(b"HMGET", b"s", b"f"), 1, usual)
        assert await pipe.execute(encode(b"GET", b"s"), 1) == [b"1"]
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
    with pytest.raises(ValueError, match="scheme 'unix' is not supported"):
        RawPipeline("unix:///tmp/redis.sock")


# ---- a Redis still loading its data set ---------------------------------------------------
async def test_a_loading_redis_is_waited_for_briefly_then_unavailable(tmp_path: Path) -> None:
    from loading_redis import is_loading, loading_redis

    from edgeflow.stores.resp import RespLoading

    # About 10 minutes of loading: it is still loading whatever this machine's speed.
    with loading_redis(tmp_path, keys=3000, delay_us=200_000) as proc:
        assert is_loading(proc.port)
        pipe = RawPipeline(proc.url, loading_wait_s=0.2)
        try:
            with pytest.raises(RespLoading) as err:
                await pipe.execute(encode(b"GET", b"k0"), 1)
            assert isinstance(err.value, RespError)  # callers answer UNAVAILABLE
            assert "still loading its data set (LOADING)" in str(err.value)
            assert f":{proc.port}" in str(err.value)
            shape = FixedReply(b"$1\r\nv\r\n", np.ones(7, dtype=bool))
            with pytest.raises(RespLoading):
                await pipe.execute_fixed(encode(b"GET", b"k0"), 1, shape)
        finally:
            await pipe.close()


async def test_a_redis_that_finishes_loading_within_the_wait_answers(tmp_path: Path) -> None:
    from loading_redis import is_loading, loading_redis

    # About 1 s of loading, against a wait far longer than any machine needs for it.
    with loading_redis(tmp_path, keys=1000, delay_us=1000) as proc:
        was_loading = is_loading(proc.port)
        pipe = RawPipeline(proc.url, loading_wait_s=120.0)
        try:
            assert await pipe.execute(encode(b"GET", b"k0"), 1) == [b"v"]
        finally:
            await pipe.close()
    assert was_loading  # otherwise this test did not test the wait


async def test_the_request_path_redis_py_client_gives_up_on_loading(tmp_path: Path) -> None:
    from loading_redis import loading_redis

    from edgeflow.stores.redis_client import connect_async

    with loading_redis(tmp_path, keys=3000, delay_us=200_000) as proc:
        client = connect_async(proc.url)
        try:
            with pytest.raises(redis.BusyLoadingError):
                await client.get("k0")
        finally:
            await client.aclose()
