"""OpenTelemetry: one tracer provider per process, W3C context carried in gRPC metadata.

Every server handler runs in a span continued from the caller's metadata, and every client
call injects the current context, so one Recommend is one trace across all services.
Spans go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set. With no exporter configured the
process keeps OpenTelemetry's no-op tracer, so an unobserved request pays nothing for spans.
The same server interceptor also keeps the gRPC server metrics (edgeflow.shell.metrics).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from time import perf_counter
from typing import Any

import grpc
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from edgeflow.shell import cpu, metrics
from edgeflow.shell.errors import RequestError
from edgeflow.shell.guard import Guard, Undecodable, clip_message

_configured = False


def setup(service: str, otlp_endpoint: str = "", processor: SpanProcessor | None = None) -> None:
    """Install the process's tracer provider once; later calls only add `processor`."""
    global _configured
    provider = trace.get_tracer_provider()
    if not otlp_endpoint and processor is None:
        return
    if not _configured:
        provider = TracerProvider(resource=Resource.create({"service.name": f"edgeflow-{service}"}))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
            )
        trace.set_tracer_provider(provider)
        _configured = True
    if processor is not None and isinstance(provider, TracerProvider):
        provider.add_span_processor(processor)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


class _NoSpan:
    """A reusable context manager yielding the invalid (non-recording) span."""

    def __enter__(self) -> trace.Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(
    tr: trace.Tracer, name: str, attributes: dict[str, Any] | None = None
) -> AbstractContextManager[trace.Span]:
    """`tr.start_as_current_span(name)`, or a shared no-op when no exporter or processor is
    configured: OpenTelemetry's own no-op tracer still costs several microseconds a span."""
    if not _configured:
        return _NO_SPAN
    return tr.start_as_current_span(name, attributes=attributes)


class _Getter:
    @staticmethod
    def get(carrier: tuple[tuple[str, str | bytes], ...], key: str) -> list[str] | None:
        vals = [v for k, v in carrier if k == key]
        return [v.decode() if isinstance(v, bytes) else v for v in vals] or None

    @staticmethod
    def keys(carrier: tuple[tuple[str, str | bytes], ...]) -> list[str]:
        return [k for k, _ in carrier]


def enabled() -> bool:
    return _configured


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata carrying the current trace context, for an outbound gRPC call."""
    if not _configured:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


class ServerTracing(grpc.aio.ServerInterceptor):
    """Continues the caller's trace in a server span named after the RPC, and observes the
    call's time and status code (edgeflow_grpc_server_*): one interceptor, not two, because
    each one costs a handler hop on every call of a six-hop request.

    The wrapped handler and its labelled metric children are built once per method; per call
    only the caller's context is read from the call's metadata (when tracing is on). gRPC's
    own services (health, reflection) are not traced or counted, so probes do not count as
    traffic. With a `guard` (edgeflow.shell.guard), the same wrapper refuses undecodable requests,
    over-long strings and large requests over the in-flight budget before the handler runs
    (and every call while the service is still loading),
    and gRPC's own services get the guard's decoding check. A handler fails its call by
    raising edgeflow.shell.errors.RequestError; this wrapper makes it the call's status.
    """

    def __init__(self, service: str, guard: Guard | None = None) -> None:
        self._tracer = tracer(f"edgeflow.{service}")
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        guard = self._guard
        if handler is None:
            return handler
        if handler.unary_unary is None or method.startswith("/grpc."):
            if guard is not None:
                handler = self._wrapped[method] = guard.wrap_plain(method, handler)
            return handler
        inner = handler.unary_unary
        span_name = method.lstrip("/")
        tr = self._tracer
        grpc_service, _, rpc = span_name.rpartition("/")
        seconds = metrics.grpc_handling(grpc_service, rpc)
        ok = metrics.grpc_handled(grpc_service, rpc, "OK")
        deserializer = handler.request_deserializer
        check = None
        if guard is not None:
            check = guard.checker(deserializer)
            deserializer = guard.deserializer(deserializer)

        async def observed(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            start = perf_counter()
            admitted = 0
            try:
                try:
                    if guard is not None:
                        if not guard.ready:
                            await ctx.abort(grpc.StatusCode.UNAVAILABLE, guard.not_ready)
                        if request.__class__ is Undecodable:
                            await guard.refuse_undecodable(ctx, method, request)
                        admitted = guard.admit()
                        if admitted < 0:
                            await ctx.abort(
                                grpc.StatusCode.RESOURCE_EXHAUSTED, guard.shed_message()
                            )
                        if check is not None and (problem := check(request)) is not None:
                            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                    if _configured:
                        metadata = tuple(ctx.invocation_metadata() or ())
                        token = context.attach(propagate.extract(metadata, getter=_Getter()))  # type: ignore[arg-type]
                        try:
                            with tr.start_as_current_span(span_name, kind=trace.SpanKind.SERVER):
                                response = await inner(request, ctx)
                        finally:
                            context.detach(token)
                    else:
                        response = await inner(request, ctx)
                # The one place a handler's typed failure becomes the call's status.
                except RequestError as exc:
                    await ctx.abort(exc.code, clip_message(exc.message))
                except cpu.DeadlineExpired as exc:
                    await ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{exc.what}: {exc}")
            except BaseException as exc:
                seconds.observe(perf_counter() - start)
                metrics.grpc_handled(grpc_service, rpc, _failed_code(exc, ctx)).inc()
                raise
            finally:
                if admitted > 0 and guard is not None:
                    guard.release(admitted)
            seconds.observe(perf_counter() - start)
            code = ctx.code()  # a handler may set a status and return
            if code is None or code is grpc.StatusCode.OK:
                ok.inc()
            else:
                metrics.grpc_handled(grpc_service, rpc, code.name).inc()
            return response

        wrapped = grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped


def _failed_code(exc: BaseException, ctx: grpc.aio.ServicerContext) -> str:
    """The status a call that raised ends with, as grpc reports it to the client."""
    code = ctx.code()  # set by context.abort (AbortError) or set_code
    if code is not None and code is not grpc.StatusCode.OK:
        return str(code.name)
    if isinstance(exc, asyncio.CancelledError):
        remaining = ctx.time_remaining()
        if remaining is not None and remaining <= 0:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    return "UNKNOWN"  # what grpc answers for an unhandled exception
