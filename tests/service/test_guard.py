"""What every gRPC server refuses before its handlers run (edgeflow.shell.guard): message sizes that
follow from the documented limits, and concurrency bounds that shed load with
RESOURCE_EXHAUSTED. Real grpc.aio servers started by the services' own start_server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from edgeflow import tensor
from edgeflow.features.schema import ENTITY_COLUMNS, MODEL_COLUMNS
from edgeflow.local.ports import free_port
from edgeflow.shell import cpu, guard, metrics
from edgeflow.shell import server as server_module
from edgeflow.shell.errors import RequestError
from edgeflow.shell.guard import MB, Limits, limits_for
from edgeflow.shell.server import Service, channel, start_server
from edgeflow.v1 import (
    candidates_pb2,
    features_pb2,
    gateway_pb2,
    merging_pb2,
    merging_pb2_grpc,
    scoring_pb2,
)
from edgeflow.v1.inference import grpc_predict_v2_pb2 as oip_pb


def test_the_documented_limits_are_the_enforced_ones() -> None:
    from edgeflow.candidates.service import MAX_BATCH
    from edgeflow.candidates.sources import MAX_LIMIT
    from edgeflow.features.service import MAX_ENTITIES
    from edgeflow.nearline import events
    from edgeflow.scoring.service import THREAD_ROWS
    from edgeflow.workflow.ops import OPS

    assert guard.MAX_CANDIDATES == MAX_ENTITIES == MAX_LIMIT
    for name, op in OPS.items():
        if name.startswith("candidates."):
            assert op.params.model_fields["limit"].metadata[-1].le == guard.MAX_CANDIDATES, name
    assert OPS["merge.blend"].max_inputs == OPS["features.fetch"].max_inputs
    assert OPS["merge.blend"].max_inputs == guard.MAX_NODE_INPUTS
    assert guard.MAX_SOURCES_PER_CALL == MAX_BATCH
    assert guard.MAX_EVENTS == events.MAX_EVENTS
    assert guard.MAX_EVENT_ID_CHARS == events.MAX_ID_LENGTH
    assert guard.MAX_SCORE_ROWS == THREAD_ROWS


def _largest_requests() -> dict[str, list[object]]:
    """Per service, its largest legitimate requests (the merging service's is built in
    test_merging, which also sends it)."""
    n, ids = guard.MAX_CANDIDATES, [2**62 + i for i in range(guard.MAX_CANDIDATES)]
    event = gateway_pb2.MemberEvent(
        type=gateway_pb2.MemberEvent.PROFILE_CHANGE, member=2**62, target=2**62,
        event_id="\U0001f600" * guard.MAX_EVENT_ID_CHARS, time=1.7e9,
        features={c: 1.0 for c in ENTITY_COLUMNS},
    )  # fmt: skip
    publish = gateway_pb2.PublishRequest(events=[event] * guard.MAX_EVENTS)
    many = candidates_pb2.GenerateManyRequest()
    for i in range(guard.MAX_SOURCES_PER_CALL):
        many.requests.add(
            member=2**62, source="precomputed", limit=n, timeout_ms=60_000,
            params={"list": f"list-{i}-{'x' * 55}", "limit": str(n), "weight": "adamic_adar"},
        )  # fmt: skip
    get = features_pb2.GetFeaturesRequest(member=2**62, entities=ids, columns=list(MODEL_COLUMNS))
    push = features_pb2.PushRequest(
        entities=ids, values=tensor.pack(np.ones((n, len(ENTITY_COLUMNS))), ENTITY_COLUMNS)
    )
    rows = guard.MAX_SCORE_ROWS
    matrix = np.ones((rows, len(MODEL_COLUMNS)), np.float32)
    score = scoring_pb2.ScoreRequest(
        model="pymk-ranker", version="v12", features=tensor.pack(matrix, MODEL_COLUMNS)
    )
    infer = oip_pb.ModelInferRequest(model_name="pymk-ranker", model_version="12", id="x" * 64)
    infer.inputs.add(name="features", datatype="FP32", shape=[rows, len(MODEL_COLUMNS)])
    infer.raw_input_contents.append(matrix.tobytes())
    infer_contents = oip_pb.ModelInferRequest(model_name="pymk-ranker")
    tensor_in = infer_contents.inputs.add(
        name="features", datatype="FP32", shape=[rows, len(MODEL_COLUMNS)]
    )
    tensor_in.contents.fp32_contents.extend(matrix.ravel().tolist())
    return {
        "gateway": [publish],
        "candidates": [many],
        "features": [get, push],
        "scoring": [score, infer, infer_contents],
    }


@pytest.mark.parametrize("service", ["gateway", "candidates", "features", "scoring"])
def test_each_service_takes_its_largest_legitimate_request(service: str) -> None:
    limits = limits_for(service)
    for request in _largest_requests()[service]:
        size = request.ByteSize()  # type: ignore[attr-defined]
        assert size <= limits.max_receive_bytes, (type(request).__name__, size)
    # and not far more: well under the 64 MB every server used to take
    assert limits.max_receive_bytes <= 8 * MB
    assert 0 < limits.max_concurrent_rpcs <= 1024


# ---- concurrency, on a real server whose handler waits until released ---------------------
class _Waiting(merging_pb2_grpc.MergingServiceServicer):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def Merge(
        self, request: merging_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> merging_pb2.MergeResponse:
        self.entered += 1
        await self.release.wait()
        return merging_pb2.MergeResponse()


class _WaitingService(Service):
    name = "waiting"
    service_names = ("edgeflow.v1.MergingService",)

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.servicer = _Waiting()

    def register(self, server: grpc.aio.Server) -> None:
        merging_pb2_grpc.add_MergingServiceServicer_to_server(self.servicer, server)


class _Running:
    def __init__(self, service: _WaitingService, server: grpc.aio.Server, port: int) -> None:
        self.service, self.server = service, server
        self.channel = channel(f"127.0.0.1:{port}")
        self.stub = merging_pb2_grpc.MergingServiceStub(self.channel)

    def call(self, request: merging_pb2.MergeRequest) -> asyncio.Task[merging_pb2.MergeResponse]:
        return asyncio.ensure_future(self.stub.Merge(request, timeout=60))

    async def entered(self, n: int) -> None:
        for _ in range(3000):
            if self.service.servicer.entered >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{n} calls never reached the handler")


async def _running(limits: Limits) -> AsyncIterator[_Running]:
    service = _WaitingService(limits)
    server, port, _ = await start_server(service, "127.0.0.1:0")
    running = _Running(service, server, port)
    try:
        yield running
    finally:
        service.servicer.release.set()
        await running.channel.close()
        await server.stop(None)


class _Loading(_WaitingService):
    """A service whose start() (its load) lasts until `loaded` is set."""

    def __init__(self) -> None:
        super().__init__(limits_for("merging"))
        self.servicer.release.set()
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()


async def test_calls_while_the_service_loads_are_unavailable_and_never_reach_it() -> None:
    service = _Loading()
    port = free_port()
    starting = asyncio.ensure_future(start_server(service, f"127.0.0.1:{port}"))
    ch = channel(f"127.0.0.1:{port}")
    stub = merging_pb2_grpc.MergingServiceStub(ch)
    try:
        for _ in range(500):  # until the port is bound; before that, connections are refused
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Merge(merging_pb2.MergeRequest(), timeout=5)
            if "still starting" in (err.value.details() or ""):
                break
            await asyncio.sleep(0.01)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == (
            "waiting: still starting (loading its data); try again shortly"
        )
        assert service.servicer.entered == 0
        service.loaded.set()
        server, _, _ = await starting
        await stub.Merge(merging_pb2.MergeRequest(), timeout=5)
        assert service.servicer.entered == 1
        await server.stop(None)
    finally:
        service.loaded.set()
        starting.cancel()
        await ch.close()


class _Warming(_Loading):
    """Loaded at once; its warm-up calls its own handler, then fails or hangs as told."""

    def __init__(self, then: str) -> None:
        super().__init__()
        self.loaded.set()
        self.then = then

    async def warm(self) -> None:
        await self.servicer.Merge(merging_pb2.MergeRequest(), None)  # type: ignore[arg-type]
        if self.then == "fails":
            raise ConnectionError("Redis refused the connection")
        await asyncio.sleep(3600)  # "hangs": start_server cuts it short


@pytest.mark.parametrize("then", ["fails", "hangs"])
async def test_a_warm_up_runs_before_serving_and_its_failure_or_stall_only_costs_time(
    then: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_module, "WARM_S", 0.2)
    service = _Warming(then)
    with caplog.at_level(logging.INFO, logger="edgeflow"):
        server, port, _ = await start_server(service, "127.0.0.1:0")
    ch = channel(f"127.0.0.1:{port}")
    try:
        assert service.servicer.entered == 1  # the warm-up's own call, before any caller's
        await merging_pb2_grpc.MergingServiceStub(ch).Merge(merging_pb2.MergeRequest(), timeout=5)
        assert service.servicer.entered == 2
        expected = "Redis refused the connection" if then == "fails" else "warm-up cut short"
        assert any(expected in r.getMessage() for r in caplog.records), caplog.text
    finally:
        await ch.close()
        await server.stop(None)


class _Failing(merging_pb2_grpc.MergingServiceServicer):
    """Fails every call the way handlers do: by raising, never by context.abort."""

    async def Merge(
        self, request: merging_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> merging_pb2.MergeResponse:
        if request.k == 1:
            raise RequestError(grpc.StatusCode.NOT_FOUND, "member: 7 is unknown; " + "x" * 5000)
        raise cpu.DeadlineExpired("merge", 0.002)


class _FailingService(_WaitingService):
    def register(self, server: grpc.aio.Server) -> None:
        merging_pb2_grpc.add_MergingServiceServicer_to_server(_Failing(), server)


async def test_a_handler_s_typed_failure_becomes_its_status_in_one_place() -> None:
    server, port, _ = await start_server(_FailingService(limits_for("merging")), "127.0.0.1:0")
    ch = channel(f"127.0.0.1:{port}")
    stub = merging_pb2_grpc.MergingServiceStub(ch)
    handled = metrics.grpc_handled("edgeflow.v1.MergingService", "Merge", "NOT_FOUND")
    before = handled._value.get()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Merge(merging_pb2.MergeRequest(k=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        details = err.value.details() or ""
        assert details.startswith("member: 7 is unknown; xxx") and "more characters" in details
        assert len(details) <= guard.MAX_MESSAGE_CHARS  # clipped, not RESOURCE_EXHAUSTED
        # Counted under the status it ended with, once the handler's wrapper has unwound
        # (the client can have the status a moment before that).
        for _ in range(200):
            if handled._value.get() > before:
                break
            await asyncio.sleep(0.01)
        assert handled._value.get() == before + 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Merge(merging_pb2.MergeRequest(k=2), timeout=5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.details() == (
            "merge: not started: the request's deadline passed 2.0 ms before"
        )
    finally:
        await ch.close()
        await server.stop(None)


def _big(ids: int) -> merging_pb2.MergeRequest:
    return merging_pb2.MergeRequest(lists=[merging_pb2.ScoredList(name="l", ids=range(ids))])


async def test_calls_over_the_concurrency_limit_are_shed_with_resource_exhausted() -> None:
    async for srv in _running(Limits(max_receive_bytes=MB, max_concurrent_rpcs=3)):
        held = [srv.call(merging_pb2.MergeRequest(k=i)) for i in range(3)]
        await srv.entered(3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.Merge(merging_pb2.MergeRequest(), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert srv.service.servicer.entered == 3  # the handler never saw it
        srv.service.servicer.release.set()
        for call in held:
            await call
        await srv.stub.Merge(merging_pb2.MergeRequest(), timeout=60)  # room again


async def test_large_requests_beyond_the_in_flight_budget_are_shed() -> None:
    limits = Limits(max_receive_bytes=8 * MB, inflight_bytes=2 * MB)
    async for srv in _running(limits):
        big = _big(400_000)  # about 1.5 MB on the wire
        first = srv.call(big)
        await srv.entered(1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.Merge(big, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting: overloaded" in (err.value.details() or "")
        # Small requests are not counted: the hot path is never shed by the budget.
        small = [srv.call(merging_pb2.MergeRequest(k=i)) for i in range(5)]
        await srv.entered(6)
        srv.service.servicer.release.set()
        for call in (first, *small):
            await call
        # The budget is free again: one request larger than all of it still runs alone.
        srv.service.servicer.release.clear()
        huge = srv.call(_big(700_000))
        await srv.entered(7)
        srv.service.servicer.release.set()
        await huge


async def test_a_message_over_the_services_size_is_refused_unread() -> None:
    async for srv in _running(Limits(max_receive_bytes=64 * 1024)):
        big = _big(100_000)
        assert big.ByteSize() > 64 * 1024
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.Merge(big, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert srv.service.servicer.entered == 0


async def test_undecodable_requests_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async for srv in _running(Limits(max_receive_bytes=MB)):
        call = srv.channel.unary_unary("/edgeflow.v1.MergingService/Merge")
        for i in range(50):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"\x12\x7f" + bytes([i]) * 20, timeout=10)  # a truncated list
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert srv.service.servicer.entered == 0
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_start_up_checks_ask_for_the_process_by_its_own_name() -> None:
    """`edgeflow up` waits for each process by its health name: another gRPC server that
    took the port in a race (SERVING for the whole server) or another edgeflow process does
    not pass for it."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from edgeflow.local.suite import _serving

    service = _WaitingService(limits_for("merging"))
    server, port, _ = await start_server(service, "127.0.0.1:0")
    other = grpc.aio.server()
    other_health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(other_health, other)
    other_port = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    await other_health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        ours, theirs = f"127.0.0.1:{port}", f"127.0.0.1:{other_port}"
        assert await asyncio.to_thread(_serving, ours, "waiting")
        assert not await asyncio.to_thread(_serving, theirs, "waiting")
        assert not await asyncio.to_thread(_serving, ours, "gateway")
    finally:
        await other.stop(None)
        await server.stop(None)
