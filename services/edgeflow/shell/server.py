"""The one way a service process runs: grpc.aio server, health, reflection, graceful drain.

A service module provides a `Service`: it registers its servicer, loads what it needs
(health stays NOT_SERVING until then), and closes its resources after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgeflow.config import Config
from edgeflow.shell import cpu, metrics, tls, tracing
from edgeflow.shell.guard import Guard, Limits, limits_for
from edgeflow.shell.tls import TlsFiles, channel_credentials, server_credentials

log = logging.getLogger("edgeflow")

T = TypeVar("T")

GRACE_S = 5.0
# Longer, and a warm-up is cut short: the service serves cold rather than later.
WARM_S = 2.0


class Service(ABC):
    """One gRPC service: `register` its servicer, `start` (load), `stop` (release)."""

    name: str  # e.g. "candidates"
    service_names: tuple[str, ...]  # full proto service names, for health and reflection
    # Message size, concurrency and string limits (edgeflow.shell.guard); None: the service's own.
    limits: Limits | None = None
    # Called by edge surfaces, which authenticate with API keys: with TLS on, it asks for no
    # client certificate. The others are reached by edgeflow's own processes only (mTLS).
    edge_facing = False

    @abstractmethod
    def register(self, server: grpc.aio.Server) -> None: ...

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors run before the server's own (the gateway's API keys)."""
        return []

    async def start(self) -> None:
        """Load models, stores and indexes; the service reports SERVING only after this."""

    async def warm(self) -> None:
        """After `start`, run representative requests through the service's own code, so
        that its first callers do not pay for what a first request opens (connection pools,
        a Redis Cluster's slot map, first-use code paths: several times a warm request's
        time). Best-effort: start_server bounds it and serves cold if it fails."""

    async def stop(self) -> None:
        """Release resources after the server has drained."""


async def _warm(service: Service) -> None:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(WARM_S):
            await service.warm()
    except Exception as exc:  # a service that cannot warm up still serves, cold
        log.info("%s: warm-up cut short after %.2fs: %s", service.name,
                 time.perf_counter() - started, exc)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def health_name(service: str) -> str:
    """The health service name every edgeflow process also answers for, by its own name: a
    start-up check that asks for it is answered SERVING by that process only, never by
    another gRPC server that happens to hold the port."""
    return f"edgeflow.{service}"


async def start_server(
    service: Service,
    address: str,
    health_servicer: health.aio.HealthServicer | None = None,
    tls_files: TlsFiles | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Bind, register health and reflection, start serving (NOT_SERVING), then load. With
    `tls_files` the port serves TLS only, and mutual TLS unless the service is edge-facing."""
    limits = service.limits or limits_for(service.name)
    guard = Guard(service.name, limits)
    guard.ready = False  # UNAVAILABLE until loaded (see edgeflow.shell.guard)
    server = grpc.aio.server(
        interceptors=[
            *service.interceptors(),
            tracing.ServerTracing(service.name, guard),
        ],
        options=[
            ("grpc.max_receive_message_length", limits.max_receive_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    service.register(server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls_files is None:
        port = server.add_insecure_port(address)
    else:
        creds = server_credentials(tls_files, require_client_cert=not service.edge_facing)
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise RuntimeError(f"{service.name}: cannot bind {address}")
    names = ("", health_name(service.name), *service.service_names)
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    started = time.perf_counter()
    await service.start()
    await _warm(service)
    guard.ready = True
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "%s serving on port %d (loaded in %.2fs)", service.name, port, time.perf_counter() - started
    )
    return server, port, health_servicer


async def drain(
    service: Service, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer
) -> None:
    """Graceful shutdown: report NOT_SERVING, let in-flight calls finish, then release."""
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACE_S)
    await service.stop()


async def serve(service: Service, cfg: Config) -> None:
    """Run a service until SIGTERM or SIGINT, then drain."""
    tracing.setup(service.name, cfg.otlp_endpoint)
    cpu.configure(threads=cfg.cpu_threads, deadline_checks=cfg.deadline_checks)
    # Bound before the (slow) load, so a taken port fails at once and names itself.
    endpoint = None
    serving = threading.Event()  # also answered on the metrics port's /healthz
    if cfg.metrics_port:
        endpoint = metrics.Endpoint(
            service.name, cfg.metrics_port, cfg.metrics_host, healthy=serving.is_set
        )
        log.info("%s metrics on %s:%d/metrics", service.name, cfg.metrics_host, endpoint.port)
    if cfg.max_concurrent_rpcs > 0:
        own = service.limits or limits_for(service.name)
        service.limits = dataclasses.replace(own, max_concurrent_rpcs=cfg.max_concurrent_rpcs)
    server, _, health_servicer = await start_server(
        service, f"{cfg.bind_host}:{cfg.port}", tls_files=tls.load(cfg.tls_dir)
    )
    serving.set()
    # What start-up loaded lives for the whole process: keep it out of the cyclic GC's
    # generations so collections on the request path stay short.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s draining", service.name)
    serving.clear()
    await drain(service, server, health_servicer)
    if endpoint is not None:
        endpoint.close()
    log.info("%s stopped", service.name)


class BearerKey(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer KEY` to each unary call of a channel."""

    def __init__(self, key: str) -> None:
        self._pair = ("authorization", f"Bearer {key}")

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._pair]
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready,
        )  # fmt: skip
        return await continuation(details, request)


def channel(
    address: str, key: str | None = None, tls_files: TlsFiles | None = None
) -> grpc.aio.Channel:
    """A client channel to a peer service, sized for feature matrices; with `key`, every
    call carries it as `authorization: Bearer` (the gateway's API keys); with `tls_files`,
    over TLS with this process's certificate."""
    interceptors = [BearerKey(key)] if key else None
    if tls_files is not None:
        return grpc.aio.secure_channel(
            address, channel_credentials(tls_files), _CHANNEL_OPTIONS, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, _CHANNEL_OPTIONS, interceptors=interceptors)


async def connect(channels: Sequence[grpc.aio.Channel], timeout_s: float) -> None:
    """Open the channels' connections now, waiting up to `timeout_s`, rather than on their
    first call, which would pay the TCP, HTTP/2 (and TLS) handshakes inside a node's timeout
    (a quarter of a cold first request's time). A peer not up yet is connected to later."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(ch.channel_ready() for ch in channels))


def sync_channel(address: str, tls_files: TlsFiles | None = None) -> grpc.Channel:
    """A blocking channel (the CLI, the nearline worker), over TLS with `tls_files`."""
    if tls_files is not None:
        return grpc.secure_channel(address, channel_credentials(tls_files), _CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, _CHANNEL_OPTIONS)


def configured_channel(address: str) -> grpc.Channel:
    """A blocking channel with this process's TLS setting (EDGEFLOW_TLS_DIR): the CLI's and
    the local suite's health checks."""
    return sync_channel(address, tls.load(Config().tls_dir))


_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_http_proxy", 0),
    # A restarted peer is back in well under a second, not after gRPC's 1 s+ backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
