"""CPU per gRPC call: edgeflow's own trace propagation against opentelemetry-instrumentation-grpc.

Each process of the suite wraps every handler in `edgeflow.shell.tracing.ServerTracing`
(guard, metrics, typed errors, and the trace span) and every outgoing call carries
`tracing.outgoing_metadata()`. The alternative keeps that wrapper for everything but the
span, and adds OpenTelemetry's aio server interceptor and client interceptors. Both are run
with tracing off (no exporter: what a suite pays by default) and on (a tracer provider with
a span processor that drops spans, so recording is paid and exporting is not).

Each variant runs in a process of its own (the tracer provider is per process), alternating
for --rounds rounds; one call is a sequential unary call over loopback, client and server in
the same process, and its CPU is the process's CPU over --calls calls.

    .venv/bin/python benchmarks/tracing_interceptors.py --out benchmarks/results/tracing.json

Needs opentelemetry-instrumentation-grpc (the release matching the locked
opentelemetry-sdk: 0.66b2 for 1.45), which the locks leave out: benchmarks/README.md has the
measured decision.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("edgeflow-off", "otel-off", "edgeflow-on", "otel-on")
METHOD = "/edgeflow.bench.Echo/Call"


async def _measure(variant: str, calls: int) -> float:
    import grpc
    from opentelemetry.sdk.trace import SpanProcessor

    from edgeflow.shell import tracing

    own, tracing_on = variant.split("-")
    if tracing_on == "on":
        tracing.setup("bench", processor=SpanProcessor())  # records spans, exports none
    server_interceptors: list[grpc.aio.ServerInterceptor] = []
    client_interceptors = None
    if own == "otel":
        from opentelemetry.instrumentation.grpc import (
            aio_client_interceptors,
            aio_server_interceptor,
        )

        server_interceptors.append(aio_server_interceptor())
        client_interceptors = aio_client_interceptors()
        tracing._configured = False  # the shell's wrapper without its own span and metadata
    server_interceptors.append(tracing.ServerTracing("bench"))

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server(interceptors=server_interceptors)
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("edgeflow.bench.Echo", {"Call": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", interceptors=client_interceptors
    ) as ch:
        call = ch.unary_unary(METHOD)
        payload = b"x" * 100
        for _ in range(200):  # warm up
            await call(payload, timeout=5, metadata=tracing.outgoing_metadata())
        start = time.process_time()
        for _ in range(calls):
            await call(payload, timeout=5, metadata=tracing.outgoing_metadata())
        cpu = time.process_time() - start
    await server.stop(None)
    return cpu / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # one measurement, in a process of its own
        print(asyncio.run(_measure(args.variant, args.calls)))
        return
    if importlib.util.find_spec("opentelemetry.instrumentation.grpc") is None:
        raise SystemExit(
            "tracing_interceptors: needs opentelemetry-instrumentation-grpc, which the locks "
            "leave out: .venv/bin/pip install 'opentelemetry-instrumentation-grpc==0.66b2'"
        )
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--calls", str(args.calls)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[variant].append(float(out.strip().splitlines()[-1]))
    med = {v: statistics.median(xs) for v, xs in runs.items()}
    result = {
        "calls": args.calls,
        "rounds": args.rounds,
        "cpu_us_per_call_median": {v: round(x, 1) for v, x in med.items()},
        "otel_over_edgeflow": {
            "tracing_off": round(med["otel-off"] / med["edgeflow-off"], 3),
            "tracing_on": round(med["otel-on"] / med["edgeflow-on"], 3),
        },
        "runs": {v: [round(x, 1) for x in xs] for v, xs in runs.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
