"""Shared fixtures: a real Redis server process, the Facebook graph, small graphs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from edgeflow.config import REPO_ROOT
from edgeflow.local.redis_server import RedisProcess, start_redis

FACEBOOK = REPO_ROOT.parent / "shared" / "data" / "facebook_combined.txt"


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture
def redis_client(redis_proc: RedisProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_proc.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def facebook_edges() -> Path:
    if not FACEBOOK.exists():
        pytest.fail(f"the Facebook graph is expected at {FACEBOOK}")
    return FACEBOOK
