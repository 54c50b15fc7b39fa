"""Which list a workflow's offline and nearline modes write, and how the gateway serves a
surface that has no online scoring: straight from that list, through the visibility filters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.ops import BlendParams
from edgeflow.workflow.validate import check

DEFAULT_K = 200
_LIST_NODE = "precomputed"
_LIST_TIMEOUT_MS = 50


def list_name(wf: Workflow) -> str:
    """The precomputed list a workflow's offline job and nearline worker write."""
    offline = wf.spec.modes.offline
    return (offline.list if offline is not None else "") or wf.surface


def list_size(wf: Workflow) -> int:
    """Edges kept per member in that list."""
    offline = wf.spec.modes.offline
    return offline.k if offline is not None else DEFAULT_K


def precomputed_view(wf: Workflow) -> Workflow:
    """The request-time graph of a surface whose online mode is off: its precomputed list,
    then its output node's blend filters, impressions and diversity (a list's order is not
    kept: the blend ranks by score). Provenance then shows each edge's mode and age."""
    out = wf.node(wf.spec.output)
    assert isinstance(out.params, BlendParams)
    params: dict[str, Any] = {"filters": list(out.params.filters)}
    for name in ("impressions", "diversity"):
        value = getattr(out.params, name)
        if value is not None:
            params[name] = value.model_dump(by_alias=True)
    spec: dict[str, Any] = {
        "surface": wf.surface,
        "description": wf.spec.description,
        "budgetMs": wf.spec.budget_ms,
        "nodes": [
            {
                "name": _LIST_NODE,
                "op": "candidates.precomputed",
                "params": {"list": list_name(wf), "limit": list_size(wf)},
                "timeoutMs": min(wf.spec.budget_ms, _LIST_TIMEOUT_MS),
                "fallback": "empty",
            },
            {
                "name": out.node.name,
                "op": "merge.blend",
                "inputs": [_LIST_NODE],
                "params": params,
                "timeoutMs": out.node.timeout_ms,
                "fallback": "fail",
            },
        ],
        "output": out.node.name,
    }
    view = check(spec, name=wf.name, source=f"workflow {wf.name!r} (served from its list)")
    # The view keeps the workflow's own modes: it serves what offline and nearline wrote.
    return Workflow(
        name=view.name,
        spec=wf.spec.model_copy(update={"nodes": view.spec.nodes, "output": view.spec.output}),
        nodes=view.nodes,
    )


def served_workflows(workflows: Mapping[str, Workflow]) -> dict[str, Workflow]:
    """What the gateway serves by surface: online workflows as written, offline-only ones
    from their lists; workflows with neither are not served."""
    served: dict[str, Workflow] = {}
    for surface, wf in workflows.items():
        if wf.spec.modes.online.enabled:
            served[surface] = wf
        elif wf.spec.modes.offline is not None:
            served[surface] = precomputed_view(wf)
    return served
