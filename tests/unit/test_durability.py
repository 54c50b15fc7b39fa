"""Acknowledged writes survive a crash of Redis: the local suite's Redis appends every write
to its AOF and fsyncs it before answering, and a home saved by snapshots only keeps its data
when it moves to the AOF."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.nearline.events import Event, publish
from edgeflow.stores import keys
from edgeflow.stores.redis_client import connect, connect_async


def sigkill(proc: RedisProcess) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"redis-server {proc.pid} outlived SIGKILL")


def block(n: int) -> Event:
    return Event(id=f"block-{n}", type="block", member=n, target=10**6 + n, time=time.time())


async def publish_until_refused(url: str, acked: list[Event], killed: asyncio.Event) -> None:
    """Publish one block after another, recording each acknowledged one, until Redis is
    gone (after the kill) or 20,000 were sent."""
    client = connect_async(url)
    try:
        for n in range(20_000):
            event = block(n)
            try:
                (entry,) = await publish(client, [event])
            except Exception:
                if killed.is_set():
                    return
                raise
            assert entry, event
            acked.append(event)
    finally:
        await client.aclose()


async def test_every_acknowledged_publish_survives_sigkill_of_redis(tmp_path: Path) -> None:
    proc = start_redis(tmp_path / "redis", persist=True)
    acked: list[Event] = []
    killed = asyncio.Event()
    writer = asyncio.create_task(publish_until_refused(proc.url, acked, killed))
    while len(acked) < 200 and not writer.done():
        await asyncio.sleep(0.01)
    killed.set()
    sigkill(proc)  # mid-stream: the writer has a publish in flight
    await asyncio.wait_for(writer, 30)
    assert len(acked) >= 200

    again = start_redis(tmp_path / "redis", port=proc.port, persist=True)
    client = connect(again.url)
    try:
        stored = {f[b"id"].decode() for _, f in client.xrange(keys.EVENTS)}
        lost = [e.id for e in acked if e.id not in stored]
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged events lost: {lost[:5]}"
        for e in (acked[0], acked[-1]):
            assert client.sismember(keys.blocked(e.member), e.target), e
            assert client.exists(keys.event_seen(e.id)), e  # a retry stays a duplicate
    finally:
        client.close()
        again.stop()


def test_a_home_saved_by_snapshots_keeps_its_data_when_it_moves_to_the_aof(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "redis"
    old = start_redis(workdir, persist=True, fsync="always")
    client = connect(old.url)
    client.set("kept", "1")
    client.save()
    client.close()
    old.stop()
    for aof in workdir.glob("appendonly*"):  # as a home from before the AOF was on
        for f in sorted(aof.rglob("*"), reverse=True):
            f.unlink()
        aof.rmdir() if aof.is_dir() else aof.unlink()
    assert (workdir / "dump.rdb").exists()

    proc = start_redis(workdir, persist=True)
    client = connect(proc.url)
    assert client.get("kept") == b"1"
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.set("after", "2")
    client.close()
    sigkill(proc)
    again = start_redis(workdir, port=proc.port, persist=True)
    client = connect(again.url)
    try:
        assert client.mget("kept", "after") == [b"1", b"2"]
    finally:
        client.close()
        again.stop()


def test_a_bad_fsync_policy_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLOW_REDIS_FSYNC", "sometimes")
    with pytest.raises(ValueError, match="EDGEFLOW_REDIS_FSYNC must be one of always"):
        start_redis(tmp_path / "redis", persist=True)
