"""What every gRPC server refuses before its handlers run, so bad input costs next to nothing.

- **Undecodable requests** (random bytes, invalid UTF-8 in a string) are answered
  INVALID_ARGUMENT, with at most one log line per LOG_EVERY_S for all of them (grpc itself
  answers UNKNOWN and logs a traceback per call).
- **String lengths.** Every string field of every request (map keys included) is at most
  DEFAULT_STRING_CHARS characters, or its own limit (`Limits.strings`); a longer one is
  INVALID_ARGUMENT naming the field, e.g. `events[3].event_id: at most 128 characters, got
  1048576`. The message never quotes the value.
- **Message size.** Each service takes messages up to `Limits.max_receive_bytes`, the size of
  its largest legitimate request (computed below from the documented limits); grpc answers
  a larger one RESOURCE_EXHAUSTED without reading it whole.
- **Readiness.** While the service is still loading (start_server, between binding its
  port and the end of `Service.start`), every call is answered UNAVAILABLE: callers retry,
  or fall back as they do for a service that is down, rather than getting answers from
  half-loaded handlers (a candidates service still loading would call every source
  unknown, which no caller falls back on).
- **Concurrency.** A server runs at most `Limits.max_concurrent_rpcs` calls at once (grpc's
  own limiter answers the next ones RESOURCE_EXHAUSTED before reading them): its legitimate
  concurrency, or fewer if that many of its largest messages would not fit the memory the
  chart leaves for calls (CALLS_MEMORY_BYTES; EDGEFLOW_MAX_CONCURRENT_RPCS overrides). It
  also handles at most `Limits.inflight_bytes` of large requests (over LARGE_BYTES each) at
  once: a large request that would exceed it is shed with RESOURCE_EXHAUSTED, unless it is
  the only one. Small requests, the hot path, are never counted.

`tracing.ServerTracing` applies the guard in the one wrapper it already puts around each
method; gRPC's own services (health, reflection) get `Guard.wrap_plain`.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import operator
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from edgeflow.features.schema import ENTITY_COLUMNS, MODEL_COLUMNS

log = logging.getLogger("edgeflow.guard")

DEFAULT_STRING_CHARS: Final = 256
LOG_EVERY_S: Final = 10.0
# Requests up to this size are never counted against Limits.inflight_bytes.
LARGE_BYTES: Final = 64 * 1024
MB: Final = 1024 * 1024

# The documented limits the message sizes follow from (tests check they agree with the code
# that enforces them: the ops' `limit` params, features' MAX_ENTITIES, Publish's MAX_EVENTS).
MAX_CANDIDATES: Final = 5000  # per candidate node, per features call, per scored list
MAX_NODE_INPUTS: Final = 16  # inputs of a features.fetch or merge.blend node
MAX_SOURCES_PER_CALL: Final = 64  # GenerateMany requests (candidates' MAX_BATCH)
MAX_EVENTS: Final = 1000  # per Publish
MAX_EVENT_ID_CHARS: Final = 128
MAX_SCORE_ROWS: Final = 20_000  # rows of one Score / ModelInfer (scoring's THREAD_ROWS)
NAME_BYTES: Final = 80  # a node, list, model or column name ("source:" + a DNS label)
VARINT_MAX: Final = 10


def _ld(payload: int) -> int:
    """Bytes of a length-delimited field (tag, length, payload)."""
    return 2 + len(f"{payload:b}") // 7 + 1 + payload


def _tensor(rows: int, columns: Sequence[str] | int) -> int:
    names = [NAME_BYTES] * columns if isinstance(columns, int) else [len(c) for c in columns]
    return _ld(2 * 6 + sum(_ld(n) for n in names) + _ld(rows * len(names) * 4))


def _publish() -> int:
    # a profile_change carrying every feature, with the longest event id (4-byte UTF-8)
    event = 2 + 2 * (1 + VARINT_MAX) + _ld(4 * MAX_EVENT_ID_CHARS) + 9
    event += sum(_ld(_ld(len(c)) + 5) for c in ENTITY_COLUMNS)
    return MAX_EVENTS * _ld(event)


def _merge() -> int:
    cols = 1 + MAX_NODE_INPUTS  # the list's score, then one column per source
    one = _ld(NAME_BYTES) + _ld(MAX_CANDIDATES * VARINT_MAX) + _tensor(MAX_CANDIDATES, cols)
    one += 5 + _ld(NAME_BYTES) + 9 + 11 + MAX_NODE_INPUTS * _ld(2 * _ld(NAME_BYTES) + 9)
    return MAX_NODE_INPUTS * _ld(one)


def _generate_many() -> int:
    # a source's params (the candidate ops take at most 3): 16, names and values
    params = 16 * _ld(2 * _ld(NAME_BYTES))
    one = 2 * (1 + VARINT_MAX) + _ld(NAME_BYTES) + 12 + params
    return MAX_SOURCES_PER_CALL * _ld(one)


def _features() -> int:
    get = _ld(MAX_CANDIDATES * VARINT_MAX) + sum(_ld(len(c)) for c in MODEL_COLUMNS) + 11
    push = _ld(MAX_CANDIDATES * VARINT_MAX) + _tensor(MAX_CANDIDATES, ENTITY_COLUMNS)
    return max(get, push)


def _scoring() -> int:
    # Score's tensor, or ModelInfer's one FP32 input as raw contents or fp32_contents
    return 2 * _ld(NAME_BYTES) + _tensor(MAX_SCORE_ROWS, MODEL_COLUMNS)


def _round_up(n: int, to: int = 64 * 1024) -> int:
    """With 5% headroom for fields added later, rounded up."""
    n = int(n * 1.05) + 16 * 1024
    return -(-n // to) * to


@dataclass(frozen=True)
class Limits:
    max_receive_bytes: int
    max_concurrent_rpcs: int = 256
    inflight_bytes: int = 32 * MB
    # Per string field ("edgeflow.v1.RecommendRequest.surface"): most characters.
    strings: Mapping[str, int] = field(default_factory=dict)

    def string_limit(self, full_name: str) -> int:
        return self.strings.get(full_name, DEFAULT_STRING_CHARS)


# What the calls in flight of one process may hold: the chart's smallest memory limit
# (512 Mi: gateway, merging) less what a service holds on its own (100-190 MB).
CALLS_MEMORY_BYTES: Final = 320 * MB
# Measured on the merging service: while a call's message is received, decoded and handled,
# the process holds about 1.7 times its size (12 concurrent 6.4 MB merges: +130 MB).
CALL_MEMORY_FACTOR: Final = 1.7


def _concurrency(max_receive_bytes: int, wanted: int) -> int:
    """The calls a server runs at once: `wanted` (its legitimate concurrency with headroom),
    fewer if that many of its largest messages would not fit CALLS_MEMORY_BYTES."""
    fits = int(CALLS_MEMORY_BYTES / (max_receive_bytes * CALL_MEMORY_FACTOR))
    return max(16, min(wanted, fits))


def _limits(max_receive_bytes: int, wanted: int, **kw: Any) -> Limits:
    return Limits(max_receive_bytes, _concurrency(max_receive_bytes, wanted), **kw)


SERVICE_LIMITS: Final[Mapping[str, Limits]] = {
    "gateway": _limits(
        _round_up(_publish()),
        256,  # Recommends are small and spend their time waiting on the backends
        strings={
            "edgeflow.v1.RecommendRequest.surface": 63,
            "edgeflow.v1.RecommendRequest.request_id": 128,
            "edgeflow.v1.MemberEvent.event_id": MAX_EVENT_ID_CHARS,
        },
    ),
    "candidates": _limits(_round_up(_generate_many()), 256, inflight_bytes=8 * MB),
    "features": _limits(_round_up(_features()), 256),
    "scoring": _limits(_round_up(_scoring()), 256),
    "merging": _limits(_round_up(_merge()), 256),
    # health and reflection only
    "nearline": Limits(max_receive_bytes=64 * 1024, max_concurrent_rpcs=64, inflight_bytes=MB),
}
FALLBACK_LIMITS: Final = Limits(max_receive_bytes=4 * MB)


def limits_for(service: str) -> Limits:
    return SERVICE_LIMITS.get(service, FALLBACK_LIMITS)


# ---- per call --------------------------------------------------------------------------------
# Size of the request being handled, set by the guarded deserializer: grpc.aio deserializes
# a unary request in the call's own task, right before it runs the handler.
_RECEIVED: contextvars.ContextVar[int] = contextvars.ContextVar("edgeflow_received", default=0)


class Undecodable:
    """What the guarded deserializer returns for bytes that are not the request message."""

    __slots__ = ("error", "size", "type_name")

    def __init__(self, size: int, error: BaseException, type_name: str) -> None:
        self.size = size
        self.error = error
        self.type_name = type_name


class RateLimitedLog:
    """At most one line per `every_s`, saying how many more were left out."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every = every_s
        self._last = float("-inf")
        self._skipped = 0

    def warning(self, msg: str, *args: object) -> bool:
        now = time.monotonic()
        if now - self._last < self._every:
            self._skipped += 1
            return False
        if self._skipped:
            msg += f" (and {self._skipped} more in the last {now - self._last:.0f} s)"
        self._last, self._skipped = now, 0
        self._log.warning(msg, *args)
        return True


# A request type's check: the first over-long string ("field.path: ..."), or None.
Checker = Callable[[Any], "str | None"]


class Guard:
    """One server's guard; see the module's docstring."""

    def __init__(self, service: str, limits: Limits | None = None) -> None:
        self.service = service
        self.limits = limits or limits_for(service)
        self.inflight = 0  # bytes of large requests being handled
        self.undecodable_log = RateLimitedLog(log)
        self._checkers: dict[str, Checker | None] = {}
        self.ready = True  # start_server clears it while the service loads
        self.not_ready = f"{service}: still starting (loading its data); try again shortly"

    # ---- decoding ----------------------------------------------------------------------------
    def deserializer(self, inner: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        if inner is None:
            return None
        desc = getattr(getattr(inner, "__self__", None), "DESCRIPTOR", None)
        type_name = desc.full_name if isinstance(desc, Descriptor) else "request message"

        def deserialize(raw: bytes) -> Any:
            size = len(raw)
            if size > LARGE_BYTES:
                _RECEIVED.set(size)
            try:
                return inner(raw)
            except Exception as exc:  # DecodeError, or anything else a parser may raise
                return Undecodable(size, exc, type_name)

        return deserialize

    async def refuse_undecodable(
        self, ctx: grpc.aio.ServicerContext, method: str, bad: Undecodable
    ) -> None:
        self.undecodable_log.warning(
            "%s: undecodable request to %s (%d bytes from %s): %s",
            self.service, method, bad.size, ctx.peer(), _short(bad.error),
        )  # fmt: skip
        await ctx.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{method}: the request ({bad.size} bytes) does not decode as {bad.type_name}",
        )

    # ---- string lengths ----------------------------------------------------------------------
    def checker(self, deserializer: Callable[[bytes], Any] | None) -> Checker | None:
        """The string-length check of a method's request type (None: it has no strings):
        the first over-long string as "field.path: at most N characters, got M", or None.
        Paths are only assembled for a failure, so a request that passes pays for reading
        each string's length and nothing else."""
        cls = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
        desc = getattr(cls, "DESCRIPTOR", None)
        if not isinstance(desc, Descriptor):
            return None
        return self._compile(desc)

    def _compile(self, desc: Descriptor) -> Checker | None:
        if desc.full_name in self._checkers:
            return self._checkers[desc.full_name]
        self._checkers[desc.full_name] = None  # a recursive type: its inner levels unchecked
        steps = [step for fd in desc.fields if (step := self._field_step(fd)) is not None]
        if not steps:
            return None

        def check(msg: Any) -> str | None:
            for step in steps:
                problem = step(msg)
                if problem is not None:
                    return problem
            return None

        self._checkers[desc.full_name] = check
        return check

    def _field_step(self, fd: FieldDescriptor) -> Checker | None:
        name = fd.name
        get = operator.attrgetter(name)
        limit = self.limits.string_limit(fd.full_name)
        if fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:

                def strings(msg: Any) -> str | None:
                    values = get(msg)
                    if max(map(len, values), default=0) <= limit:
                        return None
                    i, n = next((i, len(v)) for i, v in enumerate(values) if len(v) > limit)
                    return _too_long(f"{name}[{i}]", limit, n)

                return strings

            def string(msg: Any) -> str | None:
                n = len(get(msg))
                return _too_long(name, limit, n) if n > limit else None

            return string
        sub_desc = fd.message_type
        if fd.type != FieldDescriptor.TYPE_MESSAGE or sub_desc is None:
            return None
        if sub_desc.GetOptions().map_entry:
            key_fd, value_fd = sub_desc.fields_by_name["key"], sub_desc.fields_by_name["value"]
            key_limit = limit if key_fd.type == FieldDescriptor.TYPE_STRING else None
            value_limit = limit if value_fd.type == FieldDescriptor.TYPE_STRING else None
            value_type = value_fd.message_type
            value_check = self._compile(value_type) if value_type is not None else None
            if key_limit is None and value_limit is None and value_check is None:
                return None

            def mapping(msg: Any) -> str | None:
                entries = get(msg)
                if not entries:
                    return None
                if key_limit is not None and max(map(len, entries)) > key_limit:
                    n = max(map(len, entries))
                    return _too_long(f"{name} (a key)", key_limit, n)
                for key, value in entries.items():
                    if value_limit is not None and len(value) > value_limit:
                        return _too_long(f"{name}[{_key(key)}]", value_limit, len(value))
                    if value_check is not None and (problem := value_check(value)) is not None:
                        return f"{name}[{_key(key)}].{problem}"
                return None

            return mapping
        sub = self._compile(sub_desc)
        if sub is None:
            return None
        if fd.is_repeated:

            def messages(msg: Any) -> str | None:
                for i, item in enumerate(get(msg)):
                    problem = sub(item)
                    if problem is not None:
                        return f"{name}[{i}].{problem}"
                return None

            return messages

        def message(msg: Any) -> str | None:
            if not msg.HasField(name):
                return None
            problem = sub(get(msg))
            return None if problem is None else f"{name}.{problem}"

        return message

    # ---- large requests in flight ------------------------------------------------------------
    def admit(self) -> int:
        """Count the request being handled against the in-flight budget: its size (0 for a
        small one), or -1 when it must be shed."""
        size = _RECEIVED.get()
        if size <= LARGE_BYTES:
            return 0
        _RECEIVED.set(0)
        if self.inflight and self.inflight + size > self.limits.inflight_bytes:
            return -1
        self.inflight += size
        return size

    def release(self, size: int) -> None:
        self.inflight -= size

    def shed_message(self) -> str:
        return (
            f"{self.service}: overloaded: {self.inflight // MB} MiB of large requests in "
            f"flight (the limit is {self.limits.inflight_bytes // MB} MiB); retry later"
        )

    # ---- gRPC's own services ----------------------------------------------------------------
    def wrap_plain(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A handler whose undecodable requests get INVALID_ARGUMENT, any cardinality."""
        des = self.deserializer(handler.request_deserializer)
        if des is None:
            return handler
        ser = handler.response_serializer
        guard = self

        async def refuse(request: Any, ctx: grpc.aio.ServicerContext) -> None:
            if isinstance(request, Undecodable):
                await guard.refuse_undecodable(ctx, method, request)

        async def requests(it: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
            async for request in it:
                await refuse(request, ctx)
                yield request

        if handler.unary_unary is not None:
            uu = handler.unary_unary

            async def unary_unary(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
                await refuse(request, ctx)
                return await uu(request, ctx)

            return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
        if handler.unary_stream is not None:
            us = handler.unary_stream
            if inspect.isasyncgenfunction(us):

                async def unary_stream_gen(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
                    await refuse(request, ctx)
                    async for response in us(request, ctx):
                        yield response

                return grpc.unary_stream_rpc_method_handler(unary_stream_gen, des, ser)
            if inspect.iscoroutinefunction(us):

                async def unary_stream(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
                    await refuse(request, ctx)
                    return await us(request, ctx)

                return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
            return handler
        if handler.stream_unary is not None:
            su = handler.stream_unary

            async def stream_unary(it: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
                return await su(requests(it, ctx), ctx)

            return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
        if handler.stream_stream is not None:
            ss = handler.stream_stream
            if inspect.isasyncgenfunction(ss):

                async def stream_stream_gen(
                    it: AsyncIterator[Any], ctx: grpc.aio.ServicerContext
                ) -> Any:
                    async for response in ss(requests(it, ctx), ctx):
                        yield response

                return grpc.stream_stream_rpc_method_handler(stream_stream_gen, des, ser)
            if inspect.iscoroutinefunction(ss):

                async def stream_stream(
                    it: AsyncIterator[Any], ctx: grpc.aio.ServicerContext
                ) -> Any:
                    return await ss(requests(it, ctx), ctx)

                return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
        return handler


MAX_MESSAGE_CHARS: Final = 1000


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A status message cut to `limit` characters: whatever a handler quotes, the answer
    stays far below gRPC's metadata limits (a longer one fails as RESOURCE_EXHAUSTED)."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message) - limit + 40} more characters)"


def _too_long(where: str, limit: int, n: int) -> str:
    return f"{where}: at most {limit} characters, got {n}"


def _key(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
