"""Hand-encoded Redis pipelines on a connection of their own, replies parsed by hiredis.

redis-py spends most of a 500-command pipeline packing arguments and awaiting one reply at a
time. The hot paths know their commands' exact shape, so they encode them with numpy and
read every reply from one buffer here.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import unquote, urlparse

import hiredis

from edgeflow.redis_client import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S

_READ_CHUNK = 1 << 16


class RespError(ConnectionError):
    """Redis could not be reached or stopped answering."""


class RespReplyError(RuntimeError):
    """Redis answered a command with an error (WRONGTYPE, NOAUTH, ...)."""


class RawPipeline:
    """A small pool of dedicated connections, one pipeline in flight on each."""

    def __init__(self, url: str, size: int = 4) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", ""):
            raise ValueError(f"unsupported Redis URL scheme {parsed.scheme!r} in {url}")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._password = unquote(parsed.password) if parsed.password else None
        self._user = unquote(parsed.username) if parsed.username else None
        self._db = int(parsed.path.lstrip("/") or 0)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._size = size

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port), CONNECT_TIMEOUT_S
        )
        hello: list[bytes] = []
        if self._password is not None:
            args = [self._user, self._password] if self._user else [self._password]
            hello.append(encode(b"AUTH", *(a.encode() for a in args)))
        if self._db:
            hello.append(encode(b"SELECT", str(self._db).encode()))
        if hello:
            writer.write(b"".join(hello))
            for rep in await _read(reader, hiredis.Reader(), len(hello)):
                if isinstance(rep, hiredis.ReplyError):
                    writer.close()
                    raise RespReplyError(f"Redis at {self._host}:{self._port}: {rep}")
        return reader, writer

    async def execute(
        self, payload: bytes, replies: int, timeout_s: float = SOCKET_TIMEOUT_S
    ) -> list:
        """Send encoded commands and return their `replies` replies, in order."""
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = await self._connect()
            reader, writer = conn
            writer.write(payload)
            out = await asyncio.wait_for(_read(reader, hiredis.Reader(), replies), timeout_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, hiredis.ProtocolError) as exc:
            if conn is not None:
                conn[1].close()  # replies may be left unread: never reuse this connection
            raise RespError(
                f"Redis at {self._host}:{self._port}: {exc or type(exc).__name__}"
            ) from exc
        except BaseException:
            if conn is not None:
                conn[1].close()
            raise
        if len(self._idle) < self._size:
            self._idle.append(conn)
        else:
            writer.close()
        for rep in out:
            if isinstance(rep, hiredis.ReplyError):
                raise RespReplyError(f"Redis at {self._host}:{self._port} answered: {rep}")
        return out

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read(reader: asyncio.StreamReader, parser: hiredis.Reader, count: int) -> list:
    out: list = []
    while len(out) < count:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        parser.feed(chunk)
        while len(out) < count:
            reply = parser.gets()
            if reply is False:
                break
            out.append(reply)
    return out


def encode(*parts: bytes) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
