"""Shared fixtures: a real Redis server process, the Facebook graph, small graphs, and the
whole online suite in process."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
import world
import yaml
from inprocess import Suite, relaxed_copy, running
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from world import World, clone, train_world

from edgeflow.build.synthetic import social_graph
from edgeflow.config import REPO_ROOT
from edgeflow.graph import Graph
from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.shell import tracing

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


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """Every span the test process finishes (installed once, before any suite starts)."""
    exporter = InMemorySpanExporter()
    tracing.setup("tests", processor=SimpleSpanProcessor(exporter))
    return exporter


def _slow_variant(workflows: Path) -> None:
    """A surface whose Redis-reading sources have short deadlines and whose merge a long one."""
    doc: dict[str, Any] = yaml.safe_load((workflows / "pymk.yaml").read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = "pymk-slow"
    doc["spec"]["budgetMs"] = 5000
    for node in doc["spec"]["nodes"]:
        node["timeoutMs"] = {"features": 100, "precomputed": 100}.get(node["name"], 4000)
    (workflows / "pymk-slow.yaml").write_text(yaml.safe_dump(doc))


def _missing_model_variant(workflows: Path) -> None:
    """A surface whose scoring node names a model the registry does not have."""
    doc: dict[str, Any] = yaml.safe_load((workflows / "pymk.yaml").read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = "pymk-nomodel"
    next(n for n in doc["spec"]["nodes"] if n["name"] == "rank")["params"]["model"] = (
        "no-such-model"
    )
    (workflows / "pymk-nomodel.yaml").write_text(yaml.safe_dump(doc))


@pytest.fixture(scope="session")
def suite_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The `suite` fixture's trained 400-member world, trained once per session."""
    home = tmp_path_factory.mktemp("suite-world")
    edges = social_graph(members=world.MEMBERS, communities=world.COMMUNITIES, seed=world.SEED)
    graph = Graph.from_edges(edges[:, 0], edges[:, 1])
    workflows = home / "workflows"
    workflows.mkdir()
    relaxed_copy(REPO_ROOT / "workflows" / "pymk.yaml", workflows)
    _slow_variant(workflows)
    _missing_model_variant(workflows)
    return train_world(home, graph, workflows)


@pytest_asyncio.fixture(scope="module")
async def suite(
    tmp_path_factory: pytest.TempPathFactory, spans: InMemorySpanExporter, suite_world: World
) -> AsyncIterator[Suite]:
    """The five services on real grpc.aio servers over a 400-member graph, one per module
    (each on its own clone of the session's trained world)."""
    cfg, redis = clone(suite_world, tmp_path_factory.mktemp("suite"))
    cfg = dataclasses.replace(cfg, reload_interval_s=0.3)
    async with running(suite_world.graph, redis, cfg) as suite:
        yield suite


# The longest files first, longest at the top (measured on 2 cores): the test workers take
# whole files in collection order (scripts/test.sh turns off xdist's own reordering, which
# puts the files with the most tests first), and one of these started last would run on
# alone after everything else has finished.
LONG_FILES = (
    "test_eval.py", "test_faults.py", "test_cli.py", "test_features_service.py",
    "test_cluster_e2e.py", "test_operator.py", "test_build.py",
    "test_chart.py", "test_diversity.py", "test_offline.py", "test_redis_tls.py",
    "test_gateway.py", "test_nearline.py", "test_redis_cluster_local.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    # stable: the other files, and the tests within a file, keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
