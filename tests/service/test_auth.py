"""API keys on the edge API: no key, an unknown key, a key without the scope, and each scope,
against a real gateway over gRPC (the suite's backends); the keys file and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inprocess import Suite, members_with_degree

from edgeflow.gateway.service import GatewayService
from edgeflow.shell import auth
from edgeflow.shell.server import channel, start_server
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc


@dataclasses.dataclass
class Locked:
    port: int
    keys: Path
    member: int
    channels: list[grpc.aio.Channel] = dataclasses.field(default_factory=list)

    def stub(self, key: str | None = None) -> gateway_pb2_grpc.RecommenderStub:
        self.channels.append(channel(f"127.0.0.1:{self.port}", key))  # kept open till the end
        return gateway_pb2_grpc.RecommenderStub(self.channels[-1])


@pytest_asyncio.fixture(scope="module")
async def locked(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Locked]:
    """A second gateway over the suite's backends, with API keys on."""
    keys = tmp_path_factory.mktemp("auth") / "keys.json"
    cfg = dataclasses.replace(suite.cfg, auth=True, auth_keys=str(keys))
    gateway = GatewayService(cfg)
    server, port, _ = await start_server(gateway, "127.0.0.1:0")
    locked = Locked(port, keys, members_with_degree(suite.graph, 8)[2])
    yield locked
    for ch in locked.channels:
        await ch.close()
    await server.stop(None)
    await gateway.stop()


def recommend(member: int, **kw: bool) -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(surface="pymk", member=member, k=5, **kw)


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_call_without_a_valid_key_is_unauthenticated(locked: Locked) -> None:
    for key in (None, "ef_00000000_not-a-key"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await locked.stub(key).Recommend(recommend(locked.member), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, key
        assert "API key" in (info.value.details() or "")
    # Health needs no key (probes), and says the gateway serves.
    async with channel(f"127.0.0.1:{locked.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_each_scope_opens_its_methods_only(locked: Locked) -> None:
    reader = auth.create_key(locked.keys, ["recommend"], name="a surface")
    writer = auth.create_key(locked.keys, ["publish"])
    explainer = auth.create_key(locked.keys, ["recommend", "explain"])
    admin = auth.create_key(locked.keys, ["admin"])
    m = locked.member
    event = gateway_pb2.MemberEvent(type=gateway_pb2.MemberEvent.DISMISS, member=m, target=m + 1)
    publish = gateway_pb2.PublishRequest(events=[event])
    # The gateway reads the file again when it changes (checked at most once a second).
    await _until_ok(lambda: locked.stub(reader).Recommend(recommend(m), timeout=10))

    r, w, e, a = (locked.stub(k) for k in (reader, writer, explainer, admin))
    assert await code_of(r.Recommend(recommend(m), timeout=10)) == grpc.StatusCode.OK
    assert await code_of(r.ListSurfaces(gateway_pb2.ListSurfacesRequest(), timeout=10)) == (
        grpc.StatusCode.OK
    )
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(r.Publish(publish, timeout=10)) == denied
    assert await code_of(r.Recommend(recommend(m, debug=True), timeout=10)) == denied
    assert await code_of(r.Recommend(recommend(m, explain=True), timeout=10)) == denied
    assert await code_of(w.Recommend(recommend(m), timeout=10)) == denied
    assert await code_of(w.Publish(publish, timeout=10)) == grpc.StatusCode.OK
    assert await code_of(e.Recommend(recommend(m, explain=True), timeout=10)) == (
        grpc.StatusCode.OK
    )
    for call in (a.Recommend(recommend(m, debug=True), timeout=10), a.Publish(publish, timeout=10)):
        assert await code_of(call) == grpc.StatusCode.OK
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await w.Recommend(recommend(m), timeout=10)
    assert info.value.details() == "Recommend needs the 'recommend' scope; this key has publish"

    # Reflection is admin's: a streaming method is refused the same way.
    async def reflect(key: str) -> grpc.StatusCode:
        async with channel(f"127.0.0.1:{locked.port}", key) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                async for _ in stub.ServerReflectionInfo(iter([req]), metadata=auth.bearer(key)):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert await reflect(reader) == denied
    assert await reflect(admin) == grpc.StatusCode.OK


async def _until_ok(make_call: object, tries: int = 60) -> None:
    import asyncio

    for _ in range(tries):
        if await code_of(make_call()) == grpc.StatusCode.OK:  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the new key was never accepted")


def test_keys_file_holds_hashes_only_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "keys.json"
    key = auth.create_key(path, ["publish", "recommend", "publish"], name="ci")
    assert key.startswith("ef_") and key not in path.read_text()
    (entry,) = json.loads(path.read_text())["keys"]
    assert entry["sha256"] == auth.digest(key) and entry["scopes"] == ["recommend", "publish"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.read_keys(path) == {auth.digest(key): frozenset({"recommend", "publish"})}
    with pytest.raises(auth.AuthError, match="scopes: everything; choose from recommend"):
        auth.create_key(path, ["everything"])
    path.write_text("{not json")
    with pytest.raises(auth.AuthError, match=f"keys file {path}"):
        auth.read_keys(path)


def test_the_admin_key_is_made_once_and_kept(tmp_path: Path) -> None:
    keys = tmp_path / "auth" / "keys.json"
    first = auth.ensure_admin_key(tmp_path, keys)
    assert auth.ensure_admin_key(tmp_path, keys) == first
    assert auth.local_key(tmp_path) == first
    assert stat.S_IMODE((tmp_path / auth.ADMIN_KEY_FILE).stat().st_mode) == 0o600
    keys.unlink()  # a keys file made anew: the old admin key is no longer in it
    assert auth.ensure_admin_key(tmp_path, keys) != first


def test_create_key_prints_only_the_key(tmp_path: Path) -> None:
    env = dict(os.environ, EDGEFLOW_HOME=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "auth", "create-key", "--scopes",
         "recommend,publish", "--name", "feed"], env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    key = run.stdout.strip()
    assert run.stdout == key + "\n"
    keys = auth.read_keys(tmp_path / auth.KEYS_FILE)
    assert keys == {auth.digest(key): frozenset({"recommend", "publish"})}
    listed = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "auth", "list"], env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert "recommend,publish" in listed.stdout and "feed" in listed.stdout
    assert key not in listed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "auth", "create-key", "--scopes", "root"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "scopes: root; choose from" in bad.stderr
