"""API keys for the edge API: who may call the gateway, and for what.

A key is `ef_<id>_<secret>`. The keys file (JSON, mode 0600) holds, per key, its id, the
sha256 of the whole key, its scopes and a name; never the key itself. Clients send
`authorization: Bearer <key>`. Scopes:

- `recommend`: `Recommend` and `ListSurfaces`;
- `explain`: `Recommend` with `debug` or `explain` set (the funnel and dropped items reveal
  who blocked whom);
- `publish`: `Publish` (member events);
- `admin`: everything, reflection included.

Health checks need no key. A call without a valid key is UNAUTHENTICATED; a key without the
scope is PERMISSION_DENIED. The gateway reads the keys file again when it changes, so a key
created while it runs works at once.

Locally the file is `$EDGEFLOW_HOME/auth/keys.json` and `edgeflow up` makes an admin key in
`$EDGEFLOW_HOME/auth/admin.key`, which the CLI sends by itself; in the chart the file comes
from a Secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from edgeflow import config

log = logging.getLogger("edgeflow.auth")

SCOPES = ("recommend", "publish", "explain", "admin")
KEYS_FILE = Path("auth") / "keys.json"
ADMIN_KEY_FILE = Path("auth") / "admin.key"
RECOMMENDER = "/edgeflow.v1.Recommender/"
# Methods and the scope each needs; any other method of any service needs admin.
METHOD_SCOPES = {
    RECOMMENDER + "Recommend": "recommend",
    RECOMMENDER + "ListSurfaces": "recommend",
    RECOMMENDER + "Publish": "publish",
}
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_RELOAD_EVERY_S = 1.0


class AuthError(ValueError):
    """A keys file or a scope list that cannot be used; the message says which and why."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise AuthError(
            f"scopes: {', '.join(unknown) or 'none given'}; choose from {', '.join(SCOPES)}"
        )
    return sorted(set(scopes), key=SCOPES.index)


def read_keys(path: Path) -> dict[str, frozenset[str]]:
    """sha256 of each key -> its scopes. A missing file holds no keys."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuthError(f"keys file {path}: {exc}") from None
    out: dict[str, frozenset[str]] = {}
    for i, entry in enumerate(doc.get("keys", []) if isinstance(doc, dict) else []):
        sha, scopes = entry.get("sha256"), entry.get("scopes")
        if not isinstance(sha, str) or len(sha) != 64 or not isinstance(scopes, list):
            raise AuthError(f"keys file {path}: keys[{i}] needs sha256 (64 hex) and scopes")
        out[sha] = frozenset(parse_scopes(",".join(map(str, scopes))))
    return out


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def create_key(path: Path, scopes: Iterable[str], name: str = "") -> str:
    """A new key with `scopes`, recorded (hashed) in the keys file at `path`; returned once."""
    chosen = parse_scopes(",".join(scopes))
    key_id = secrets.token_hex(4)
    key = f"ef_{key_id}_{secrets.token_urlsafe(24)}"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        doc = {"keys": []}
    except (OSError, ValueError) as exc:
        raise AuthError(f"keys file {path}: {exc}") from None
    doc.setdefault("keys", []).append({
        "id": key_id, "sha256": digest(key), "scopes": chosen, "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })  # fmt: skip
    _write_private(path, json.dumps(doc, indent=1) + "\n")
    return key


def ensure_admin_key(home: Path, keys_path: Path) -> str:
    """The local admin key, made (and recorded in the keys file) when there is none."""
    admin = home / ADMIN_KEY_FILE
    if admin.exists():
        key = admin.read_text().strip()
        if digest(key) in read_keys(keys_path):
            return key
    key = create_key(keys_path, ["admin"], name="local admin (edgeflow up)")
    _write_private(admin, key + "\n")
    return key


def local_key(home: Path) -> str | None:
    """The key the CLI sends: $EDGEFLOW_API_KEY, else the local admin key if there is one."""
    env = config.api_key()
    if env:
        return env
    try:
        return (home / ADMIN_KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def bearer(key: str | None) -> list[tuple[str, str]]:
    """Call metadata carrying `key` (none without one)."""
    return [("authorization", f"Bearer {key}")] if key else []


def cli_metadata(home: Path | None = None) -> list[tuple[str, str]]:
    """What the CLI sends to the gateway: the local key of `home` (default $EDGEFLOW_HOME)."""
    if home is None:
        from edgeflow import config

        home = config.load().home
    return bearer(local_key(home))


class KeyStore:
    """The keys file, read again when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, frozenset[str]] = {}
        self._stamp: float | None = -1.0  # the file's mtime when read (None: no file)
        self._checked = 0.0
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Read the file again if it changed: at most once a second (a removed key stops
        working within a second), or at once when `force` (a key not known yet)."""
        now = time.monotonic()
        if not force and now - self._checked < _RELOAD_EVERY_S:
            return
        self._checked = now
        try:
            stamp = self.path.stat().st_mtime
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a bad file is reported once per change
        try:
            self._keys = read_keys(self.path)
        except AuthError as exc:  # keep the keys last read: a bad edit does not lock all out
            log.error("%s (keeping the %d keys read before)", exc, len(self._keys))

    def key_count(self) -> int:
        """How many keys the file holds."""
        return len(self._keys)

    def scopes(self, key: str) -> frozenset[str] | None:
        self._refresh()
        sha = digest(key)
        if sha not in self._keys:  # perhaps made a moment ago: one stat to find out
            self._refresh(force=True)
        return self._keys.get(sha)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as `handler` that fails the call with `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the caller's key and its scopes before any handler of the server runs."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        handler = await continuation(details)
        if method in OPEN_METHODS or handler is None:
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "missing API key: send `authorization: Bearer KEY`")  # fmt: skip
        scopes = self.store.scopes(token)
        if scopes is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        if "admin" in scopes:
            return handler
        need = METHOD_SCOPES.get(method, "admin")
        if need not in scopes:
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                         f"{method.rsplit('/', 1)[-1]} needs the {need!r} scope; this key "
                         f"has {', '.join(sorted(scopes))}")  # fmt: skip
        if method == RECOMMENDER + "Recommend" and "explain" not in scopes:
            return _without_explain(handler)
        return handler


def _without_explain(handler: grpc.RpcMethodHandler) -> Any:
    """Recommend for a key without the explain scope: debug and explain are refused."""
    inner = handler.unary_unary

    async def recommend(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # (an undecodable request has neither: the guard inside refuses it)
        if getattr(request, "debug", False) or getattr(request, "explain", False):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "debug and explain need the 'explain' scope; this key has recommend",
            )
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        recommend,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
