"""The candidate-recall ceiling of `edgeflow eval`: of the hidden edges of the members asked,
the share each candidate source of the surface's workflow returns, and the share that no
source returns (which no ranking can recover).

Each candidate node is asked through the candidates service's `Generate` with the node's own
limit and params, as the gateway asks it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc
from edgeflow.workflow.compiled import Workflow

CONCURRENCY = 2


def candidate_requests(wf: Workflow) -> dict[str, candidates_pb2.GenerateRequest]:
    """Each candidate node's request without the member, by node name."""
    out: dict[str, candidates_pb2.GenerateRequest] = {}
    for cn in wf.nodes:
        if not cn.node.op.startswith("candidates."):
            continue
        params = cn.params.model_dump(exclude_none=True)
        out[cn.node.name] = candidates_pb2.GenerateRequest(
            source=cn.node.op.split(".", 1)[1],
            limit=int(params.pop("limit")),
            params={key: str(v) for key, v in params.items()},
        )
    return out


async def generate_all(
    connect: Callable[[], grpc.aio.Channel],
    requests: dict[str, candidates_pb2.GenerateRequest],
    members: list[int],
) -> tuple[dict[str, dict[int, set[int]]], list[str]]:
    """Every source's candidates of every member: {node: {member: ids}}, and the errors."""
    ch = connect()
    stub = candidates_pb2_grpc.CandidateServiceStub(ch)
    sem = asyncio.Semaphore(CONCURRENCY)
    found: dict[str, dict[int, set[int]]] = {name: {} for name in requests}
    errors: list[str] = []

    async def one(name: str, template: candidates_pb2.GenerateRequest, m: int) -> None:
        req = candidates_pb2.GenerateRequest()
        req.CopyFrom(template)
        req.member = m
        async with sem:
            try:
                resp = await stub.Generate(req, timeout=30)
            except grpc.aio.AioRpcError as exc:  # counted as nothing found
                errors.append(f"{name}, member {m}: {exc.code().name} {exc.details()}")
                found[name][m] = set()
                return
        found[name][m] = set(resp.ids)

    await asyncio.gather(*(one(n, r, m) for n, r in requests.items() for m in members))
    await ch.close()
    return found, errors


def ceiling(
    found: dict[str, dict[int, set[int]]], truth: dict[int, set[int]], members: list[int]
) -> dict[str, object]:
    """Share of the members' hidden edges that each source returns, any source returns, and
    no source returns."""
    total = sum(len(truth[m]) for m in members)

    def share(hits: int) -> float:
        return round(hits / total, 5) if total else 0.0

    by_source = {
        name: share(sum(len(truth[m] & got.get(m, set())) for m in members))
        for name, got in found.items()
    }
    union = sum(
        len(truth[m] & set().union(*(got.get(m, set()) for got in found.values()))) for m in members
    )
    return {"by_source": by_source, "any_source": share(union), "no_source": share(total - union)}
