"""Finding a workflow and loading what a batch run reads, for the offline job and the worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from edgeflow.candidates.sources import Reader, open_collection
from edgeflow.config import Config
from edgeflow.offline.executor import OfflineError
from edgeflow.offline.inputs import EXACT_EBR_MAX, FeatureTable, Inputs, embedding_index
from edgeflow.scoring.registry import ModelRegistry
from edgeflow.stores import keys
from edgeflow.stores.graph_store import load_graph
from edgeflow.stores.redis_client import SyncClient
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.ops import OnnxParams
from edgeflow.workflow.validate import WorkflowError, load_directory, load_workflow

log = logging.getLogger("edgeflow.offline")


def find_workflow(cfg: Config, name: str) -> Workflow:
    """A workflow file, or the workflow of that surface or name in the workflows directory."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_workflow(path)
    workflows, errors = load_directory(cfg.workflows_dir)
    for wf in workflows.values():
        if name in (wf.surface, wf.name):
            return wf
    problems = [f"no workflow {name!r} in {cfg.workflows_dir} (it has {sorted(workflows)})"]
    problems += [f"{e.source}: {p}" for e in errors for p in e.problems]
    raise WorkflowError(name, problems)


def check_models(wf: Workflow, registry: ModelRegistry) -> None:
    """Fail before the first batch when a scoring node's model is not in the registry."""
    from edgeflow.scoring.registry import ModelNotFoundError

    for cn in wf.nodes:
        if isinstance(cn.params, OnnxParams):
            try:
                registry.get(cn.params.model, cn.params.version)
            except ModelNotFoundError as exc:
                raise OfflineError(f"node {cn.node.name!r} field params.model: {exc}") from None


def load_inputs(
    cfg: Config, client: SyncClient, wf: Workflow, exact_ebr_max: int = EXACT_EBR_MAX
) -> Inputs:
    """The graph (with its nearline changes), every member's features read once, the exact
    EBR index from the same embeddings, the live HNSW collection past `exact_ebr_max`
    members, and the model registry. Close the result when the run ends."""
    graph = load_graph(client, cache_dir=cfg.graph_dir)
    table = FeatureTable.load(client, graph.ids)
    registry = ModelRegistry(cfg.model_dir)
    for problem in registry.refresh():
        log.warning("model registry: %s", problem)
    check_models(wf, registry)
    index = embedding_index(table, graph.ids)
    ann = live_collection(cfg, client) if graph.n > exact_ebr_max and index is not None else None
    return Inputs.build(graph, table, registry, client, index, ann)


def live_collection(cfg: Config, client: SyncClient) -> Reader | None:
    """The embedding collection the candidates service searches, opened for this process;
    None, with a warning saying why, when there is none or it cannot be opened (the run
    then searches exactly, at O(members) a member)."""
    raw = cast(bytes | None, client.get(keys.EMBEDDINGS_CURRENT))
    if raw is None:
        log.warning("no live embedding collection (%s unset): EBR searches exactly",
                    keys.EMBEDDINGS_CURRENT)  # fmt: skip
        return None
    try:
        return open_collection(cfg, raw.decode())
    except Exception as exc:  # the shard's or the server client's own error types
        log.warning("embedding collection %s not opened, EBR searches exactly: %s",
                    raw.decode(), exc)  # fmt: skip
        return None
