"""Runs one request's workflow DAG: parallel fan-out/fan-in, per-node deadlines from the
request's budget, fallbacks and a funnel of what each node did.

An explain run also collects every item the filters and quotas dropped (with the node that
dropped it) and the feature rows each scoring node was given; a plain run does neither."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from edgeflow import tensor
from edgeflow.candidates.service import ListsOnly
from edgeflow.gateway.frame import Frame, SourceInfo, union
from edgeflow.gateway.remote import RemoteError, RemoteScorer
from edgeflow.merging import diversity, filters, impressions
from edgeflow.merging.service import MergingService
from edgeflow.shell import tracing
from edgeflow.shell.errors import RequestError
from edgeflow.shell.tls import TlsFiles
from edgeflow.v1 import (
    candidates_pb2,
    candidates_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    gateway_pb2,
    merging_pb2,
    merging_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
    tensor_pb2,
)
from edgeflow.workflow.compiled import CompiledNode, Workflow
from edgeflow.workflow.ops import BlendParams, FetchParams, Kind, OnnxParams, RemoteParams

T = TypeVar("T")

_tracer = tracing.tracer("edgeflow.gateway")


class UnknownMember(Exception):
    """The candidates service answered NOT_FOUND for the member (its own
    candidates.sources.MemberNotFound): a client error, not a degraded response."""


class NodeFailed(Exception):
    """A node whose fallback is `fail` failed; the request fails with its status."""

    def __init__(self, node: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"node {node!r}: {message}")
        self.node = node
        self.code = code


class NoCandidates(NodeFailed):
    """Every candidate source of the request failed, so the answer would be empty: the
    request fails UNAVAILABLE (a caller retries or shows its own fallback) instead of an OK
    with nothing in it."""

    def __init__(self, failures: list[str]) -> None:
        Exception.__init__(self, "no candidates: every candidate source failed: "
                           + "; ".join(failures))  # fmt: skip
        self.node = ""
        self.code = grpc.StatusCode.UNAVAILABLE


class NodeError(Exception):
    """A node could not produce its output (the fallback decides what happens next)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Clients:
    candidates: candidates_pb2_grpc.CandidateServiceStub
    features: features_pb2_grpc.FeatureServiceStub
    scoring: scoring_pb2_grpc.ScoringServiceStub
    merging: merging_pb2_grpc.MergingServiceStub

    @classmethod
    def over(
        cls,
        candidates: grpc.aio.Channel,
        features: grpc.aio.Channel,
        scoring: grpc.aio.Channel,
        merging: grpc.aio.Channel,
    ) -> Clients:
        """Stubs of the four backends over their channels."""
        return cls(
            candidates=candidates_pb2_grpc.CandidateServiceStub(candidates),
            features=features_pb2_grpc.FeatureServiceStub(features),
            scoring=scoring_pb2_grpc.ScoringServiceStub(scoring),
            merging=merging_pb2_grpc.MergingServiceStub(merging),
        )


@dataclass(frozen=True)
class Scored:
    """The rows a scoring node was given (explain runs): its candidates and their features."""

    node: str
    ids: np.ndarray
    features: tensor_pb2.Tensor


@dataclass
class Outcome:
    frame: Frame
    partial: bool
    degraded: list[str] = field(default_factory=list)
    traces: list[gateway_pb2.NodeTrace] = field(default_factory=list)
    total_ms: float = 0.0
    # Explain runs only, in workflow node order.
    dropped_items: list[tensor_pb2.DroppedItem] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)


_SOURCE_MODE = {"precomputed": "offline"}
# A merging call, or a precomputed source's, that fails with these runs in the gateway
# instead (Engine._merging, Engine._generate_here), when at least _HERE_MIN_S of the
# request's budget is left for a timed-out one.
_RUN_HERE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_HERE_MIN_S = 0.005
# A candidates service that is down fails every source of the request at once, so a list
# read standing in for it is then the surface's only source: it may take up to this share of
# what is left of the request's budget, if that is more than its node's timeout. (A gateway
# starved of CPU was seen to take 20-27 ms for a read that a 20 ms node allows, and the
# request then failed with 150 ms of its budget left.)
_DOWN_SHARE = 0.5
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class _Batch:
    """One GenerateMany of the request in flight, and each candidate node's index in it."""

    task: asyncio.Future[candidates_pb2.GenerateManyResponse]
    index: dict[str, int]
    # perf_counter() until which a node may wait for the call, when that is longer than its
    # own timeout (see Engine._plan); other nodes wait their own timeout.
    wait_until: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Run:
    """What every node of one request shares."""

    member: int
    k: int
    deadline: float
    t0: float
    outcome: Outcome
    explain: bool
    batches: dict[str, _Batch]  # candidate node -> the GenerateMany that carries it


BATCHING = ("auto", "timeout", "all")


@dataclass(frozen=True)
class _Group:
    """Candidate nodes sent in one GenerateMany, its timeout, and the nodes that may wait
    for the whole call rather than their own (shorter) timeout."""

    nodes: list[CompiledNode]
    timeout_ms: int
    wait_whole: tuple[str, ...]


def _auto_groups(wf: Workflow, roots: list[CompiledNode]) -> list[_Group]:
    """One call for the sources with the longest timeout and every source whose consumers
    all wait on one of those anyway; one call per timeout for the others."""
    inputs = {cn.node.name: list(cn.node.inputs) for cn in wf.nodes}
    above: dict[str, set[str]] = {}  # node -> every node upstream of it

    def upstream(name: str) -> set[str]:
        found = above.get(name)
        if found is None:
            found = set()
            for parent in inputs[name]:
                found |= {parent, *upstream(parent)}
            above[name] = found
        return found

    longest = max(cn.node.timeout_ms for cn in roots)
    slow = {cn.node.name for cn in roots if cn.node.timeout_ms == longest}
    main: list[CompiledNode] = []
    covered: list[str] = []
    others: dict[int, list[CompiledNode]] = {}
    for cn in roots:
        name = cn.node.name
        consumers = [n for n, ins in inputs.items() if name in ins]
        if name in slow:
            main.append(cn)
        elif consumers and all(upstream(c) & slow for c in consumers):
            main.append(cn)
            covered.append(name)
        else:
            others.setdefault(cn.node.timeout_ms, []).append(cn)
    return [
        _Group(main, longest, tuple(covered)),
        *(_Group(nodes, t, ()) for t, nodes in others.items()),
    ]


class Engine:
    def __init__(
        self,
        clients: Clients,
        batching: str = "auto",
        local_merging: MergingService | None = None,
        local_candidates: ListsOnly | None = None,
    ) -> None:
        """`batching` says how a request's candidate sources are sent to the candidates
        service (EDGEFLOW_CANDIDATE_BATCHES): "all" in one GenerateMany, each node waiting
        its own timeout; "timeout" in one per node timeout; "auto" (see `_plan`) in one,
        except a source with a shorter timeout whose answer is needed before the slower
        ones' is, which gets a call of its own."""
        if batching not in BATCHING:
            raise ValueError(
                f"EDGEFLOW_CANDIDATE_BATCHES must be one of {', '.join(BATCHING)}, got {batching!r}"
            )
        self._c = clients
        self._batching = batching
        # The merging service's own code, run here when it is unreachable (UNAVAILABLE):
        # blends and visibility filters stay exact, with the gateway's Redis connection.
        self._local_merging = local_merging
        # Likewise the precomputed lists, read from Redis, when the candidates service is.
        self._local_candidates = local_candidates
        self._plans: dict[int, tuple[Workflow, list[_Group]]] = {}
        self._templates: dict[int, tuple[CompiledNode, candidates_pb2.GenerateRequest]] = {}
        # Whether the candidates service answers GenerateMany (an older one does not).
        self._many = True
        self._remote = RemoteScorer()
        self._ops: dict[str, Callable[..., Coroutine[Any, Any, Frame]]] = {
            "features.fetch": self._fetch,
            "scoring.onnx": self._score,
            "scoring.remote": self._score_remote,
        }

    def use(self, clients: Clients, tls_files: TlsFiles | None = None) -> None:
        """Call the backends over new channels from now on (a renewed certificate); model
        servers too, with `tls_files`."""
        self._c = clients
        if tls_files is not None:
            self._remote.use(tls_files)

    async def close(self) -> None:
        """Close the channels the engine opened itself (those of remote model servers)."""
        await self._remote.close()

    async def _merging(
        self,
        call: Awaitable[T],
        here: Callable[[MergingService], Coroutine[Any, Any, T]],
        deadline: float,
        timeout: float,
    ) -> tuple[T, str]:
        """The merging service's answer to `call`. If it is down (UNAVAILABLE), or missed the
        node's `timeout` (DEADLINE_EXCEEDED: a starved or overloaded process) while the
        request's budget, which ends at `deadline` (perf_counter), has time left, `here` runs
        on the in-process merging: the same code on the same Redis, so the same answer, with
        why; a timed-out call gets one more `timeout` at most. Any other failure is the
        node's."""
        try:
            return await call, ""
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if self._local_merging is None or code not in _RUN_HERE_ON:
                raise
            if code is grpc.StatusCode.UNAVAILABLE:
                return await answer_here(here(self._local_merging)), _ran_here("merging", exc)
            left = min(deadline - time.perf_counter(), timeout)
            if left < _HERE_MIN_S:
                raise
            try:
                async with asyncio.timeout(left):
                    out = await answer_here(here(self._local_merging))
            except TimeoutError:
                raise exc from None
            return out, _ran_here("merging", exc)

    async def _generate_here(
        self,
        cn: CompiledNode,
        member: int,
        exc: grpc.aio.AioRpcError | NodeError,
        deadline: float,
    ) -> Frame:
        """A candidate node whose service is down (its node's timeout, or _DOWN_SHARE of the
        request's remaining budget if that is more), or missed the node's timeout with time
        left in the request's budget (as in `_merging`: one more timeout at most), from the
        gateway's own list reader (a precomputed source); any other source, or any other
        failure, is the node's."""
        local = self._local_candidates
        req = self._generate_template(cn)
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
        budget, timeout = deadline - time.perf_counter(), cn.node.timeout_ms / 1000.0
        if code is grpc.StatusCode.UNAVAILABLE:
            timeout = max(timeout, _DOWN_SHARE * budget)
        left = min(budget, timeout)
        if (local is None or code not in _RUN_HERE_ON or req.source not in local.sources
                or (code is grpc.StatusCode.DEADLINE_EXCEEDED and left < _HERE_MIN_S)):  # fmt: skip
            raise exc
        one = candidates_pb2.GenerateRequest()
        one.CopyFrom(req)
        one.member = member
        try:
            async with asyncio.timeout(max(left, _HERE_MIN_S)):
                answer = await answer_here(local.generate(one))
        except TimeoutError:
            raise exc from None
        frame = _candidates(cn, answer)
        frame.ran_here = _ran_here("candidates", exc)
        return frame

    async def run(
        self, wf: Workflow, member: int, k: int, budget_s: float, explain: bool = False
    ) -> Outcome:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        t0 = time.perf_counter()
        deadline = t0 + budget_s
        outcome = Outcome(frame=Frame.empty(), partial=False)
        batches = self._start_batches(wf, member, budget_s)
        run = _Run(member, k, deadline, t0, outcome, explain, batches)
        futures: dict[str, asyncio.Future[Frame]] = {}
        for cn in wf.nodes:  # topological order: inputs are scheduled first
            deps = [futures[d] for d in cn.node.inputs]
            futures[cn.node.name] = asyncio.ensure_future(self._node(cn, deps, run))
        try:
            await asyncio.gather(*futures.values())
        except BaseException:
            for fut in futures.values():
                fut.cancel()
            raise
        finally:
            for batch in run.batches.values():  # every node waiting on it may have timed out
                batch.task.cancel()
        outcome.frame = futures[wf.spec.output].result()
        if not len(outcome.frame) and outcome.partial:
            sources = [t for t in outcome.traces if t.op.startswith("candidates.")]
            if sources and all(t.status == "fallback" for t in sources):
                raise NoCandidates([f"{t.node}: {t.error}" for t in sources])
        outcome.total_ms = (time.perf_counter() - t0) * 1000
        order = {cn.node.name: i for i, cn in enumerate(wf.nodes)}
        outcome.traces.sort(key=lambda t: order[t.node])
        if explain:
            outcome.dropped_items.sort(key=lambda d: order[d.node])
            outcome.scored.sort(key=lambda s: order[s.node])
        return outcome

    def _start_batches(self, wf: Workflow, member: int, budget_s: float) -> dict[str, _Batch]:
        """The graph's candidate sources in GenerateMany calls (see `_plan`), all started at
        once: one hop for many sources instead of one per source."""
        if not self._many:
            return {}
        batches: dict[str, _Batch] = {}
        started = time.perf_counter()
        for group in self._plan(wf):
            timeout = min(budget_s, group.timeout_ms / 1000.0)
            if timeout <= 0:
                continue
            req = candidates_pb2.GenerateManyRequest()
            for cn in group.nodes:
                item = req.requests.add()
                item.CopyFrom(self._generate_template(cn))
                item.member = member
                item.timeout_ms = cn.node.timeout_ms
            task = asyncio.ensure_future(
                self._c.candidates.GenerateMany(
                    req, timeout=timeout, metadata=tracing.outgoing_metadata()
                )
            )
            batch = _Batch(
                task,
                {cn.node.name: i for i, cn in enumerate(group.nodes)},
                {name: started + timeout for name in group.wait_whole},
            )
            batches.update((cn.node.name, batch) for cn in group.nodes)
        return batches

    def _plan(self, wf: Workflow) -> list[_Group]:
        """How the workflow's candidate sources are batched, made once per compiled graph.

        A GenerateMany answers when its slowest source is done (the candidates service
        cuts every source at its own `timeout_ms`). A source with a shorter timeout in the
        same call (a precomputed list's 20 ms next to friends of friends' 40) would then be
        given up on by its node even when the service answered it in a millisecond. With
        "auto", such a source stays in the call and its node waits as long as the call, when
        everything that consumes it waits on a slower source of the call anyway (pymk's
        features and blend do): that costs the request no time. A source whose answer is
        needed sooner gets a call of its own, with the sources of its timeout.
        """
        cached = self._plans.get(id(wf))
        if cached is not None and cached[0] is wf:
            return cached[1]
        roots = [cn for cn in wf.nodes if cn.kind is Kind.CANDIDATES and not cn.node.inputs]
        groups: list[_Group] = []
        if len(roots) >= 2:
            longest = max(cn.node.timeout_ms for cn in roots)
            if self._batching == "all":
                groups = [_Group(roots, longest, ())]
            elif self._batching == "timeout":
                by: dict[int, list[CompiledNode]] = {}
                for cn in roots:
                    by.setdefault(cn.node.timeout_ms, []).append(cn)
                groups = [_Group(nodes, t, ()) for t, nodes in by.items()]
            else:
                groups = _auto_groups(wf, roots)
        self._plans[id(wf)] = (wf, groups)
        return groups

    async def _node(self, cn: CompiledNode, deps: list[asyncio.Future[Frame]], run: _Run) -> Frame:
        inputs = [await d for d in deps]
        outcome = run.outcome
        start = time.perf_counter()
        name, op = cn.node.name, cn.node.op
        trace = gateway_pb2.NodeTrace(
            node=name, op=op, status="ok", items_in=sum(len(f) for f in inputs),
            start_ms=(start - run.t0) * 1000, inputs=cn.node.inputs,
        )  # fmt: skip
        dropped: list[tensor_pb2.DroppedItem] | None = None
        if run.explain:
            dropped = []
            features = inputs[0].features if inputs else None
            if cn.kind is Kind.SCORED and features is not None:
                outcome.scored.append(Scored(name, inputs[0].ids, features))
        timeout = min(cn.node.timeout_ms / 1000.0, run.deadline - start)
        with tracing.span(_tracer, f"node {name}", {"edgeflow.op": op}) as span:
            try:
                if timeout <= 0:
                    raise NodeError(
                        "no time left in the request budget", grpc.StatusCode.DEADLINE_EXCEEDED
                    )
                frame = await self._execute(cn, inputs, run, timeout, dropped)
                if frame.ran_here:
                    trace.status, trace.fallback, trace.error = "fallback", "local", frame.ran_here
                    outcome.partial = True
                    outcome.degraded.append(f"{name}: {frame.ran_here} (fallback: local)")
                if dropped:
                    for item in dropped:
                        item.node = name
                    outcome.dropped_items.extend(dropped)
            except UnknownMember:
                raise
            except (NodeError, grpc.aio.AioRpcError, ValueError) as exc:
                code, msg = _describe(exc, cn.node.timeout_ms, timeout)
                span.set_attribute("edgeflow.fallback", cn.fallback)
                span.set_attribute("edgeflow.error", msg)
                if cn.fallback == "fail":
                    raise NodeFailed(name, code, msg) from None
                frame = _fallback(cn, inputs)
                trace.status, trace.fallback, trace.error = "fallback", cn.fallback, msg
                outcome.partial = True
                outcome.degraded.append(f"{name}: {msg} (fallback: {cn.fallback})")
            span.set_attribute("edgeflow.items_out", len(frame))
        trace.items_out = len(frame)
        trace.note = frame.note
        trace.duration_ms = (time.perf_counter() - start) * 1000
        outcome.traces.append(trace)
        return frame

    async def _execute(
        self,
        cn: CompiledNode,
        inputs: list[Frame],
        run: _Run,
        timeout: float,
        dropped: list[tensor_pb2.DroppedItem] | None,
    ) -> Frame:
        """Run the node's op; filters and blends append their dropped items to `dropped`
        when it is a list (explain runs)."""
        op, member, k = cn.node.op, run.member, run.k
        if op.startswith("candidates."):
            try:
                batch = run.batches.get(cn.node.name)
                if batch is not None:
                    resp = await self._batched(cn, batch, member, timeout)
                    if resp is not None:
                        return _candidates(cn, resp)
                return await self._generate(cn, member, timeout)
            except (grpc.aio.AioRpcError, NodeError) as exc:
                return await self._generate_here(cn, member, exc, run.deadline)
        if op.startswith("filter."):
            return await self._filter(cn, inputs, member, timeout, dropped, run.deadline)
        if op == "merge.blend":
            return await self._blend(cn, inputs, member, k, timeout, dropped, run.deadline)
        return await self._ops[op](cn, inputs, member, k, timeout)

    # ---- ops -----------------------------------------------------------------------------
    def _generate_template(self, cn: CompiledNode) -> candidates_pb2.GenerateRequest:
        """The node's request without the member, built once per compiled node."""
        cached = self._templates.get(id(cn))
        if cached is not None and cached[0] is cn:
            return cached[1]
        params = cn.params.model_dump(exclude_none=True)  # an unset param is not sent
        template = candidates_pb2.GenerateRequest(
            source=cn.node.op.split(".", 1)[1],
            limit=int(params.pop("limit")),
            params={key: str(v) for key, v in params.items()},
        )
        self._templates[id(cn)] = (cn, template)
        return template

    async def _batched(
        self, cn: CompiledNode, batch: _Batch, member: int, timeout: float
    ) -> candidates_pb2.GenerateResponse | None:
        """This node's answer from the request's GenerateMany; None when the candidates
        service does not have GenerateMany (the node then calls Generate itself)."""
        wait_until = batch.wait_until.get(cn.node.name)
        if wait_until is not None:  # its consumers wait on a slower source of this call
            timeout = max(timeout, wait_until - time.perf_counter())
        try:
            many = await asyncio.wait_for(asyncio.shield(batch.task), timeout)
        except TimeoutError:
            raise NodeError(
                f"timed out after {math.floor(timeout * 1000)} ms "
                f"(node timeout {cn.node.timeout_ms} ms)",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._many = False
            return None
        result = many.results[batch.index[cn.node.name]]
        if result.code == grpc.StatusCode.NOT_FOUND.value[0]:
            raise UnknownMember(result.message or f"member {member} not found")
        if result.code:
            code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
            raise NodeError(f"{code.name}: {result.message}", code)
        return result.response

    async def _generate(self, cn: CompiledNode, member: int, timeout: float) -> Frame:
        req = candidates_pb2.GenerateRequest()
        req.CopyFrom(self._generate_template(cn))
        req.member = member
        try:
            resp = await self._c.candidates.Generate(
                req, timeout=timeout, metadata=tracing.outgoing_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise UnknownMember(exc.details() or f"member {member} not found") from None
            raise
        return _candidates(cn, resp)

    async def _fetch(
        self, cn: CompiledNode, inputs: list[Frame], member: int, k: int, timeout: float
    ) -> Frame:
        frame = union(inputs)
        assert isinstance(cn.params, FetchParams)
        if not frame.ids.size:
            return frame
        resp = await self._c.features.GetFeatures(
            features_pb2.GetFeaturesRequest(
                member=member, entities=frame.ids.tolist(), columns=cn.params.columns
            ),
            timeout=timeout,
            metadata=tracing.outgoing_metadata(),
        )
        frame.features = resp.features
        return frame

    async def _score(
        self, cn: CompiledNode, inputs: list[Frame], member: int, k: int, timeout: float
    ) -> Frame:
        frame = inputs[0]
        assert isinstance(cn.params, OnnxParams)
        if not frame.ids.size:
            return frame
        if frame.features is None:
            raise NodeError("no features to score (the features node fell back)")
        resp = await self._c.scoring.Score(
            scoring_pb2.ScoreRequest(
                model=cn.params.model,
                version=cn.params.version,
                features=frame.features,
                member=member,
            ),
            timeout=timeout,
            metadata=tracing.outgoing_metadata(),
        )
        scores = tensor.unpack(resp.scores)[:, 0]
        if scores.size != frame.ids.size:
            raise NodeError(f"model returned {scores.size} scores for {frame.ids.size} rows")
        out = Frame(ids=frame.ids, sources=frame.sources, info=frame.info, score=scores)
        return out

    async def _score_remote(
        self, cn: CompiledNode, inputs: list[Frame], member: int, k: int, timeout: float
    ) -> Frame:
        assert isinstance(cn.params, RemoteParams)
        try:
            return await self._remote.score(cn.params, cn.node.timeout_ms, inputs[0], timeout)
        except RemoteError as exc:
            raise NodeError(str(exc), exc.code) from None

    async def _filter(
        self,
        cn: CompiledNode,
        inputs: list[Frame],
        member: int,
        timeout: float,
        dropped: list[tensor_pb2.DroppedItem] | None,
        deadline: float,
    ) -> Frame:
        frame = inputs[0]
        if not frame.ids.size:
            return frame
        req = merging_pb2.FilterRequest(
            member=member, ids=frame.ids.tolist(), filters=[cn.node.op.split(".", 1)[1]],
            explain=dropped is not None,
        )  # fmt: skip
        resp, ran_here = await self._merging(
            self._c.merging.Filter(req, timeout=timeout, metadata=tracing.outgoing_metadata()),
            lambda local: local.filter(req, timeout),
            deadline,
            timeout,
        )
        out = frame.take(np.asarray(resp.keep, dtype=np.int64))
        out.ran_here = ran_here
        out.dropped = {d.reason: d.count for d in resp.dropped}
        if dropped is not None:
            dropped.extend(resp.dropped_items)
        return out

    async def _blend(
        self,
        cn: CompiledNode,
        inputs: list[Frame],
        member: int,
        k: int,
        timeout: float,
        dropped: list[tensor_pb2.DroppedItem] | None,
        deadline: float,
    ) -> Frame:
        assert isinstance(cn.params, BlendParams)
        rule = diversity.Rule.of(cn.params.diversity) if cn.params.diversity else None
        req = merging_pb2.MergeRequest(
            member=member, k=rule.merge_k(k) if rule else k,
            filters=filters.served(cn.params.filters),
            quotas=[merging_pb2.Quota(source=s, max=q) for s, q in cn.params.quotas.items()],
            explain=dropped is not None,
        )  # fmt: skip
        if cn.params.impressions is not None:
            req.impressions.CopyFrom(impressions.Rule.of(cn.params.impressions).message())
        if rule is not None:  # Merge re-ranks its best merge_k(k) and serves k of them
            req.diversity.CopyFrom(rule.message(k))
        for name, frame in zip(cn.node.inputs, inputs, strict=True):
            # Filled in place: a ScoredList passed to the constructor would be copied.
            _fill_scored_list(req.lists.add(), name, frame, cn.params.weights.get(name, 1.0))
        resp, ran_here = await self._merging(
            self._c.merging.Merge(req, timeout=timeout, metadata=tracing.outgoing_metadata()),
            lambda local: local.merge(req, timeout),
            deadline,
            timeout,
        )
        # k at most, even from a merging service that predates diversity (and so returns
        # its whole pool in blended order).
        edges = list(resp.edges)[:k]
        out = Frame(ids=np.asarray([e.target for e in edges], dtype=np.int64))
        out.ran_here = ran_here
        out.edges = edges
        out.dropped = {d.reason: d.count for d in resp.dropped}
        if dropped is not None:
            dropped.extend(resp.dropped_items)
        return out


def _ran_here(service: str, exc: grpc.aio.AioRpcError | NodeError) -> str:
    if isinstance(exc, NodeError):
        code, details = exc.code, str(exc)
    else:
        code, details = exc.code(), exc.details() or ""
    details = " ".join(details.split())[:200]
    return f"{service} {code.name}: {details}; ran in the gateway"


async def answer_here(work: Coroutine[Any, Any, T]) -> T:
    """A request the gateway runs with a backend's own code: its RequestError becomes the
    node's error, as the same failure over gRPC would."""
    try:
        return await work
    except RequestError as exc:
        raise NodeError(exc.message, exc.code) from None


def _candidates(cn: CompiledNode, resp: candidates_pb2.GenerateResponse) -> Frame:
    source = cn.node.op.split(".", 1)[1]
    ids = tensor.ids(resp.ids)
    scores = tensor.unpack(resp.scores)[:, 0] if resp.scores.rows else np.zeros(0, np.float32)
    mode = resp.mode or _SOURCE_MODE.get(source, "online")  # the list entry's own mode
    info = SourceInfo(mode=mode, age_seconds=resp.age_seconds)
    return Frame(
        ids=ids, sources={cn.node.name: scores.copy()}, info={cn.node.name: info},
        note=resp.note,
    )  # fmt: skip


def _fill_scored_list(out: merging_pb2.ScoredList, name: str, frame: Frame, weight: float) -> None:
    """Column 0 is the list's score (model score, or the first source's as a stand-in)."""
    src_names = list(frame.sources)
    src_cols = [frame.sources[s] for s in src_names]
    n = frame.ids.size
    matrix = np.empty((n, 1 + len(src_names)), dtype="<f4")
    if frame.score is not None:
        matrix[:, 0], out.model_column = frame.score, 0
    else:
        matrix[:, 0], out.model_column = _first_present(src_cols, n), -1
    for j, col in enumerate(src_cols, 1):
        matrix[:, j] = col
    out.name = name
    out.ids.extend(frame.ids.tolist())
    scores = out.scores
    scores.rows, scores.cols = n, matrix.shape[1]
    scores.columns.extend(["score", *(f"source:{s}" for s in src_names)])
    scores.data = matrix.tobytes()  # row-major little-endian: the wire layout
    out.weight = weight
    infos = [(s, frame.info[s]) for s in src_names if s in frame.info]
    for s, info in infos:
        out.sources.add(name=s, mode=info.mode, age_seconds=info.age_seconds)
    modes = {info.mode for _, info in infos}
    out.mode = modes.pop() if len(modes) == 1 else ("mixed" if modes else "online")
    out.age_seconds = max((info.age_seconds for _, info in infos), default=0.0)


def _first_present(cols: list[np.ndarray], n: int) -> np.ndarray:
    """Per row, the first source score that is present; 0 where none is."""
    if not cols:
        return np.zeros(n, dtype=np.float32)
    out = np.array(cols[0], dtype=np.float32)
    for col in cols[1:]:
        missing = np.isnan(out)
        out[missing] = col[missing]
    return np.nan_to_num(out, copy=False, nan=0.0)


def _fallback(cn: CompiledNode, inputs: list[Frame]) -> Frame:
    if cn.fallback == "passthrough" and inputs:
        frame = union(inputs)
        return Frame(ids=frame.ids, sources=frame.sources, info=frame.info, score=None)
    empty = Frame.empty()
    if cn.kind is Kind.CANDIDATES and not cn.node.inputs:
        empty.info[cn.node.name] = SourceInfo(mode="online")
    return empty


def _describe(exc: Exception, timeout_ms: int, timeout_s: float) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            budget = math.floor(timeout_s * 1000)
            return code, f"timed out after {budget} ms (node timeout {timeout_ms} ms)"
        return code, f"{code.name}: {exc.details()}"
    if isinstance(exc, NodeError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
