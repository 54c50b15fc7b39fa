"""`edgeflow ingest`: load an edge list into the member graph in Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

from edgeflow.config import Config
from edgeflow.graph import Graph, read_edge_list
from edgeflow.stores import keys
from edgeflow.stores.graph_store import save_graph
from edgeflow.stores.redis_client import SyncClient


def ingest_file(
    client: SyncClient, path: Path, on_note: Callable[[str], object] | None = None
) -> Graph:
    """Parse, build and store the graph; raises EdgeFileError naming the file (and the bad
    line), also when no edge between two different members is left. `on_note` hears what
    was dropped or not read (self loops, duplicate edges, extra columns), one sentence each.
    """
    edges = read_edge_list(path)
    if on_note is not None:
        for note in edges.notes():
            on_note(note)
    graph = Graph.from_edges(edges.src, edges.dst)
    save_graph(client, graph)
    return graph


def current_version(client: SyncClient) -> str | None:
    """The version of the graph in Redis, or None when none was ingested."""
    raw = cast(bytes | None, client.get(keys.GRAPH_CURRENT))
    return raw.decode() if raw is not None else None


def live_graph(cfg: Config, edges: Path) -> str:
    """Why ingesting into cfg.redis_url would replace a live graph: a local suite under
    cfg.home is up on that Redis, and everything built from its graph would keep serving
    beside the new one. "" when no suite serves it."""
    from edgeflow.local import suite as local

    suite = local.Suite.load(cfg.home)
    if suite is None or not local.uses_redis(suite, cfg.redis_url):
        return ""
    up = local.running_services(suite)
    if not up:
        return ""
    return (
        f"the suite under {suite.home} is up ({', '.join(up)}) and serves the graph in Redis "
        f"at {cfg.redis_url}. Ingesting {edges} would replace that graph under it, while its "
        "embeddings, member features, ranker and precomputed lists stay those of the old one. "
        f"To serve the new graph, run `edgeflow quickstart --edges {edges}` (it stops the suite, "
        "ingests, trains, computes the lists and starts it again), or stop the suite first "
        "with `edgeflow down`. To replace the live graph anyway, add --replace-live."
    )


def rebuild_steps(cfg: Config, edges: Path, live: bool) -> str:
    """What to run after replacing a graph: everything trained or computed from the old one."""
    from edgeflow.workflow.modes import list_name
    from edgeflow.workflow.validate import load_directory

    try:
        workflows, _ = load_directory(cfg.workflows_dir)
    except OSError:
        workflows = {}
    offline = [wf for wf in workflows.values() if wf.spec.modes.offline is not None]
    names = ", ".join(list_name(wf) for wf in offline)
    stale = "the embeddings (Qdrant), member features (Feast), the ranker" + (
        f" and the precomputed lists ({names})" if offline else ""
    )
    runs = ", ".join(f"`edgeflow offline run --workflow {wf.surface}`" for wf in offline)
    train_then_lists = "`edgeflow train`" + (f", then {runs}" if runs else "")
    # Training writes fresh embeddings, features and models beside what is served (the
    # candidates service reads its own copy of the embeddings), so it runs beside a suite.
    how = train_then_lists + (
        " (the running suite switches to each as it is published)" if live else ""
    )
    return f"{stale} were built from the previous graph: rebuild them with {how}"
