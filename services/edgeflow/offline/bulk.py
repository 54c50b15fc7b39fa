"""The lists that served surfaces read, computed in this process, one run per list: what
`edgeflow quickstart` does after training so that every surface it serves has its list."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from edgeflow.config import Config
from edgeflow.offline import job
from edgeflow.offline.context import load_inputs
from edgeflow.offline.executor import BatchRunner, OfflineError
from edgeflow.stores import lists
from edgeflow.stores.graph_store import GraphNotLoaded
from edgeflow.stores.redis_client import SyncClient
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.modes import list_name, served_workflows
from edgeflow.workflow.ops import PrecomputedParams
from edgeflow.workflow.validate import load_directory


@dataclass(frozen=True)
class Computed:
    list: str
    workflow: str
    version: str
    members: int
    pairs_scored: int
    seconds: float
    error: str = ""  # why the list was not computed

    def summary(self) -> str:
        if self.error:
            return (
                f"list {self.list!r} (workflow {self.workflow}) not computed: {self.error}; "
                f"run `edgeflow offline run --workflow {self.workflow}` once that is fixed"
            )
        return (
            f"list {self.list!r} (workflow {self.workflow}): {self.members:,} members, "
            f"{self.pairs_scored:,} pairs scored in {self.seconds:.1f}s"
        )


def lists_read(workflows: Mapping[str, Workflow]) -> set[str]:
    """The lists that the served graph of some surface reads (a candidates.precomputed node)."""
    return {
        cn.params.list
        for wf in served_workflows(workflows).values()
        for cn in wf.nodes
        if isinstance(cn.params, PrecomputedParams)
    }


def writers(workflows: Mapping[str, Workflow]) -> list[Workflow]:
    """The workflows whose offline mode writes a list that a served surface reads."""
    read = lists_read(workflows)
    return [
        wf
        for wf in workflows.values()
        if wf.spec.modes.offline is not None and list_name(wf) in read
    ]


def compute_lists(
    cfg: Config,
    client: SyncClient,
    workflows: Mapping[str, Workflow],
    batch_size: int = 256,
    threads: int = 2,
) -> list[Computed]:
    """Run the offline job of every writer, each as one shard, and publish its list.

    A pending run of such a list is abandoned first: it was computed from an older graph.
    """
    done: list[Computed] = []
    # The batches' matrix products are small: BLAS threads would only spin against the
    # batch threads and the model (as in `edgeflow offline run`).
    with threadpool_limits(limits=1, user_api="blas"):
        for wf in writers(workflows):
            t0 = time.perf_counter()
            name = list_name(wf)
            try:
                job.abandon(client, name)
                run = job.begin(client, name, 1, wf.name)
                inputs = load_inputs(cfg, client, wf)
                try:
                    runner = BatchRunner(wf, inputs)
                    ids = inputs.graph.ids
                    report = job.run_shard(client, runner, run, 0, ids, batch_size, threads=threads)
                finally:
                    inputs.close()
            except (OfflineError, job.RunConflict, GraphNotLoaded, lists.ListError) as exc:
                took = time.perf_counter() - t0
                done.append(Computed(name, wf.name, "", 0, 0, took, error=str(exc)))
                continue
            took = time.perf_counter() - t0
            done.append(
                Computed(name, wf.name, report.version, report.members, report.pairs_scored, took)
            )
    return done


def compute_served_lists(cfg: Config, client: SyncClient) -> list[Computed]:
    """`compute_lists` for the valid workflows of the configured workflows directory."""
    workflows, _ = load_directory(cfg.workflows_dir)
    return compute_lists(cfg, client, workflows)
