"""Finding a workflow and loading what a batch run reads, for the offline job and the worker."""

from __future__ import annotations

import logging
from pathlib import Path

from edgeflow.config import Config
from edgeflow.graph_store import load_graph
from edgeflow.offline.executor import OfflineError
from edgeflow.offline.inputs import FeatureTable, Inputs, embedding_index
from edgeflow.redis_client import SyncClient
from edgeflow.scoring.registry import ModelRegistry
from edgeflow.workflow.ops import OnnxParams
from edgeflow.workflow.validate import Workflow, WorkflowError, load_directory, load_workflow

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


def load_inputs(cfg: Config, client: SyncClient, wf: Workflow) -> Inputs:
    """The graph (with its nearline changes), every member's features read once, the EBR
    index from the same embeddings, and the model registry."""
    graph = load_graph(client, cache_dir=cfg.graph_dir)
    table = FeatureTable.load(client, graph.ids)
    registry = ModelRegistry(cfg.model_dir)
    for problem in registry.refresh():
        log.warning("model registry: %s", problem)
    check_models(wf, registry)
    return Inputs.build(graph, table, registry, client, embedding_index(table, graph.ids))
