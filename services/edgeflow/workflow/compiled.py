"""A validated workflow graph as the executors run it: nodes in topological order, with the
graphs of its experiment variants and shadows (built by edgeflow.workflow.validate)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeflow.workflow import variants as variants_mod
from edgeflow.workflow.assign import Bucketing, assign
from edgeflow.workflow.model import Node, Shadow, WorkflowSpec
from edgeflow.workflow.ops import Kind, OpSpec, Params


@dataclass(frozen=True)
class CompiledNode:
    node: Node
    op: OpSpec
    params: Params
    fallback: str
    kind: Kind


@dataclass(frozen=True)
class Workflow:
    """A validated graph, nodes in topological order."""

    name: str
    spec: WorkflowSpec
    nodes: tuple[CompiledNode, ...]
    # The graph of each combination of experiment variants, and of each shadow.
    variants: Mapping[variants_mod.Assignments, Workflow] = field(default_factory=dict)
    shadows: tuple[tuple[Shadow, Workflow], ...] = ()
    bucketing: tuple[Bucketing, ...] = ()

    @property
    def surface(self) -> str:
        return self.spec.surface

    def for_member(self, member: int) -> tuple[Workflow, variants_mod.Assignments]:
        """The graph that serves the member, and the variants it is assigned."""
        if not self.bucketing:
            return self, ()
        assignments = assign(self.bucketing, member)
        return self.variants.get(assignments, self), assignments

    def all_graphs(self) -> list[tuple[str, Workflow]]:
        """The workflow's own graph, every variant's and every shadow's, each with a label
        for messages ("" for the workflow's own)."""
        out: list[tuple[str, Workflow]] = [("", self)]
        for assignments, graph in self.variants.items():
            label = " + ".join(f"experiment {e!r} variant {v!r}" for e, v in assignments)
            out.append((label, graph))
        out.extend((f"shadow {s.name!r}", graph) for s, graph in self.shadows)
        return out

    def node(self, name: str) -> CompiledNode:
        return next(n for n in self.nodes if n.node.name == name)
