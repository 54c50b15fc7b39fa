"""A trained world, made once per test session and cloned for each module that needs one.

Training (embeddings into Qdrant, Feast apply + materialize, the ranker) takes most of a
suite's set-up. A world is trained once into its own home and Redis, whose data set is then
saved; a clone copies the home, starts a fresh Redis on the saved data and points the Feast
repo at it, so each module still gets its own state to change.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from edgeflow.build.feast_features import render_repo
from edgeflow.build.train import train
from edgeflow.config import Config
from edgeflow.graph import Graph
from edgeflow.local.redis_server import RedisProcess, start_redis
from edgeflow.stores.graph_store import save_graph
from edgeflow.stores.redis_client import connect

# The session's world: social_graph(members, communities, seed), which draws each member's
# community first from its seed (tests that need the communities draw them again).
MEMBERS, COMMUNITIES, SEED = 400, 8, 3


@dataclasses.dataclass(frozen=True)
class World:
    home: Path  # the trained home; redis/dump.rdb holds its Redis data set
    graph: Graph
    workflows: Path


def train_world(home: Path, graph: Graph, workflows: Path, seed: int = 0) -> World:
    redis = start_redis(home / "redis")
    try:
        client = connect(redis.url)
        save_graph(client, graph)
        cfg = dataclasses.replace(
            Config(), home=home, redis_url=redis.url, workflows_dir=workflows
        )
        train(cfg, seed=seed)
        client.save()  # the clones start from this data set
        client.close()
    finally:
        redis.stop()
    return World(home, graph, workflows)


def clone(world: World, dest: Path) -> tuple[Config, RedisProcess]:
    """A copy of the world in `dest` with its own Redis; the config's workflows are the
    world's (replace `workflows_dir` for others)."""
    shutil.copytree(world.home, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.pid", "*.log"))  # fmt: skip
    redis = start_redis(dest / "redis")  # loads the saved dump.rdb
    cfg = dataclasses.replace(
        Config(), home=dest, redis_url=redis.url, workflows_dir=world.workflows
    )
    render_repo(cfg)  # Feast's feature_store.yaml names the clone's Redis
    return cfg, redis
