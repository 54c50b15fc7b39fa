"""Precomputed lists on a real Redis: round trip, atomic swap, half-written batches, nearline.

Every read test runs with both readers the services use: redis-py and the RawPipeline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import cast, overload

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.stores import keys, lists
from edgeflow.stores.resp import RawPipeline

Reader = aioredis.Redis | RawPipeline


def _reader(url: str, kind: str) -> Reader:
    return aioredis.Redis.from_url(url) if kind == "redis-py" else RawPipeline(url)


async def _close(reader: Reader) -> None:
    await (reader.aclose() if isinstance(reader, aioredis.Redis) else reader.close())


@pytest.fixture(params=["redis-py", "raw"])
async def areader(
    redis_proc: RedisProcess, request: pytest.FixtureRequest
) -> AsyncIterator[Reader]:
    reader = _reader(redis_proc.url, request.param)
    yield reader
    await _close(reader)


def _batch(
    members: Sequence[int] | np.ndarray, offset: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A distinct list per member: ids member+1.. and scores that show the batch (offset)."""
    return [
        (np.arange(m + 1, m + 4, dtype=np.int64), np.asarray([3, 2, 1], np.float32) + offset)
        for m in np.asarray(members).tolist()
    ]


async def test_round_trip_version_and_meta(redis_client: redis.Redis, areader: Reader) -> None:
    members = np.asarray([10, 20, 30])
    version = lists.write_lists(redis_client, "pymk", members, _batch(members, 0.5))
    assert lists.current_version(redis_client, "pymk") == version

    got = await lists.read_list(areader, "pymk", 20)
    assert got is not None
    assert got.ids.tolist() == [21, 22, 23]
    assert got.scores.tolist() == [3.5, 2.5, 1.5]
    assert got.version == version
    assert 0.0 <= got.age_seconds < 60
    meta = cast(dict[bytes, bytes], redis_client.hgetall(keys.list_meta("pymk", version)))
    assert int(meta[b"members"]) == 3 and int(meta[b"candidates"]) == 9
    assert float(meta[b"created_at"]) == pytest.approx(got.created_at)
    # Complete batches are permanent: the pending TTL was lifted before the swap.
    assert _ttl(redis_client, keys.list_entry("pymk", version, 20)) == -1

    assert await lists.read_list(areader, "pymk", 99) is None  # member without a list
    assert await lists.read_list(areader, "other", 20) is None  # list never written


async def test_age_comes_from_the_entry(redis_client: redis.Redis, areader: Reader) -> None:
    version = lists.write_lists(redis_client, "pymk", np.asarray([1]), _batch([1], 0))
    old = lists.encode_entry(np.asarray([5, 6]), np.asarray([0.9, 0.1]), time.time() - 100)
    redis_client.set(keys.list_entry("pymk", version, 2), old)
    got = await lists.read_list(areader, "pymk", 2)
    assert got is not None and got.ids.tolist() == [5, 6]
    assert 100 <= got.age_seconds < 160


async def test_swap_expires_the_previous_version(
    redis_client: redis.Redis, areader: Reader
) -> None:
    members = np.asarray([1, 2])
    v1 = lists.write_lists(redis_client, "pymk", members, _batch(members, 0), version="v1")
    v2 = lists.write_lists(redis_client, "pymk", members, _batch(members, 10), grace_s=30)
    got = await lists.read_list(areader, "pymk", 1)
    assert got is not None and got.version == v2 and got.scores[0] == 13
    for key in (keys.list_entry("pymk", v1, 1), keys.list_meta("pymk", v1)):
        assert 0 < _ttl(redis_client, key) <= 30
    assert _ttl(redis_client, keys.list_entry("pymk", v2, 1)) == -1


def _ttl(client: redis.Redis, key: str) -> int:
    return int(client.ttl(key))  # type: ignore[arg-type]


class _Pausing(Sequence[tuple[np.ndarray, np.ndarray]]):
    """Lists that stop the writer at `at` (after earlier entries reached Redis) or fail there."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]], at: int, fail: bool) -> None:
        self.items, self.at, self.fail = items, at, fail
        self.reached, self.go = threading.Event(), threading.Event()

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[np.ndarray, np.ndarray]]: ...
    def __getitem__(self, i: int | slice) -> object:
        return self.items[i]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, item in enumerate(self.items):
            if i == self.at:
                if self.fail:
                    raise RuntimeError("writer died")
                self.reached.set()
                self.go.wait(10)
            yield item


async def test_readers_never_see_a_half_written_batch(
    redis_client: redis.Redis, areader: Reader
) -> None:
    members = np.arange(3000)
    v1 = lists.write_lists(redis_client, "pymk", members, _batch(members, 0), version="v1")
    pausing = _Pausing(_batch(members, 100), at=2500, fail=False)
    writer = asyncio.create_task(
        asyncio.to_thread(lists.write_lists, redis_client, "pymk", members, pausing, "v2")
    )
    assert await asyncio.to_thread(pausing.reached.wait, 10)
    # Half of v2 is in Redis, yet readers still get v1 for every member.
    assert redis_client.exists(keys.list_entry("pymk", "v2", 0))
    for member in (0, 1999, 2999):
        got = await lists.read_list(areader, "pymk", member)
        assert got is not None and got.version == v1 and got.scores[0] == 3
    pausing.go.set()
    assert await writer == "v2"
    got = await lists.read_list(areader, "pymk", 2999)
    assert got is not None and got.version == "v2" and got.scores[0] == 103


async def test_a_writer_that_dies_leaves_the_old_batch_live(
    redis_client: redis.Redis, areader: Reader
) -> None:
    members = np.arange(2500)
    lists.write_lists(redis_client, "pymk", members, _batch(members, 0), version="v1")
    with pytest.raises(RuntimeError, match="writer died"):
        lists.write_lists(
            redis_client, "pymk", members, _Pausing(_batch(members, 9), 2100, True), "v2"
        )
    got = await lists.read_list(areader, "pymk", 5)
    assert got is not None and got.version == "v1"
    assert lists.current_version(redis_client, "pymk") == "v1"
    # The orphaned entries expire on their own.
    assert 0 < _ttl(redis_client, keys.list_entry("pymk", "v2", 5)) <= lists.PENDING_TTL_S
    assert not redis_client.exists(keys.list_meta("pymk", "v2"))


def test_bad_batches_are_rejected_with_what_and_where(redis_client: redis.Redis) -> None:
    ok = (np.asarray([1, 2]), np.asarray([0.5, 0.4]))
    with pytest.raises(lists.ListError, match="2 members but 1 lists"):
        lists.write_lists(redis_client, "pymk", np.asarray([1, 2]), [ok])
    with pytest.raises(lists.ListError, match="member 7 appears more than once"):
        lists.write_lists(redis_client, "pymk", np.asarray([7, 7]), [ok, ok])
    bad = (np.asarray([1, 2, 3]), np.asarray([0.5]))
    with pytest.raises(lists.ListError, match=r"member 8 \(index 1\)"):
        lists.write_lists(redis_client, "pymk", np.asarray([4, 8]), [ok, bad])
    with pytest.raises(lists.ListError, match="list name 'a b'"):
        lists.write_lists(redis_client, "a b", np.asarray([1]), [ok])
    lists.write_lists(redis_client, "pymk", np.asarray([1]), [ok], version="v1")
    with pytest.raises(lists.ListError, match="version 'v1' already exists"):
        lists.write_lists(redis_client, "pymk", np.asarray([1]), [ok], version="v1")


async def test_nearline_update_writes_into_the_live_version(
    redis_client: redis.Redis, areader: Reader
) -> None:
    new = [(np.asarray([42]), np.asarray([0.7]))]
    assert lists.update_lists(redis_client, "pymk", np.asarray([1]), new) is None
    version = lists.write_lists(redis_client, "pymk", np.asarray([1, 2]), _batch([1, 2], 0))
    assert lists.update_lists(redis_client, "pymk", np.asarray([2]), new) == version
    got = await lists.read_list(areader, "pymk", 2)
    assert got is not None and got.ids.tolist() == [42] and got.version == version
    other = await lists.read_list(areader, "pymk", 1)
    assert other is not None and other.ids.tolist() == [2, 3, 4]


async def test_corrupt_entry_is_named(redis_client: redis.Redis, areader: Reader) -> None:
    version = lists.write_lists(redis_client, "pymk", np.asarray([1]), _batch([1], 0))
    redis_client.set(keys.list_entry("pymk", version, 3), b"garbage")
    with pytest.raises(lists.ListError, match=f"list 'pymk' version {version} .*member 3"):
        await lists.read_list(areader, "pymk", 3)


async def test_reads_survive_a_script_flush(redis_client: redis.Redis, areader: Reader) -> None:
    version = lists.write_lists(redis_client, "pymk", np.asarray([1]), _batch([1], 0))
    redis_client.script_flush()  # the writer's scripts: only the reader's is counted below
    before = await lists.read_list(areader, "pymk", 1)
    assert _cached_scripts(redis_client) == 1
    redis_client.script_flush()  # the next EVALSHA answers NOSCRIPT
    assert _cached_scripts(redis_client) == 0
    got = await lists.read_list(areader, "pymk", 1)
    assert got is not None and before is not None and got.version == version
    assert got.ids.tolist() == before.ids.tolist() == [2, 3, 4]
    assert got.scores.tolist() == before.scores.tolist()
    assert _cached_scripts(redis_client) == 1  # loaded again, for the reads after this one
    again = await lists.read_list(areader, "pymk", 1)
    assert again is not None and again.ids.tolist() == [2, 3, 4]


def _cached_scripts(client: redis.Redis) -> int:
    return int(cast(dict[str, int], client.info("memory"))["number_of_cached_scripts"])


@pytest.mark.parametrize("kind", ["redis-py", "raw"])
async def test_reads_recover_after_a_redis_restart(tmp_path: Path, kind: str) -> None:
    proc = start_redis(tmp_path, persist=True)
    try:
        client = redis.Redis.from_url(proc.url)
        version = lists.write_lists(client, "pymk", np.asarray([1]), _batch([1], 0))
        client.close()
        reader = _reader(proc.url, kind)
        try:
            assert (await lists.read_list(reader, "pymk", 1)) is not None
            proc.stop()
            proc = start_redis(tmp_path, port=proc.port, persist=True)  # no scripts cached
            try:
                got = await lists.read_list(reader, "pymk", 1)
            except (ConnectionError, redis.ConnectionError):
                got = await lists.read_list(reader, "pymk", 1)  # its connection was pre-restart
            assert got is not None and got.version == version and got.ids.tolist() == [2, 3, 4]
        finally:
            await _close(reader)
    finally:
        proc.stop()
