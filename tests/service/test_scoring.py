"""Scoring: the model registry on disk and the scoring service over real gRPC.

Models are real: small sklearn classifiers exported with skl2onnx and run by onnxruntime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from skl2onnx import to_onnx
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from edgeflow import tensor
from edgeflow.config import Config
from edgeflow.local.ports import free_port
from edgeflow.scoring.registry import (
    ModelNotFoundError,
    ModelRegistry,
    RegistryError,
    publish_model,
    published_versions,
)
from edgeflow.scoring.rollout import RolloutError, promote, set_canary
from edgeflow.scoring.service import ScoringService
from edgeflow.shell.server import channel, drain, start_server
from edgeflow.v1 import scoring_pb2, scoring_pb2_grpc

FEATURES = ["common_neighbors", "adamic_adar", "jaccard", "cand_degree", "embedding_cosine"]
SERVICE = "edgeflow.v1.ScoringService"


@dataclass
class Trained:
    model: Any
    onnx: bytes

    def proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(x)[:, 1], dtype=np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, len(FEATURES))).astype(np.float32)
    y = (x[:, 0] + 0.7 * x[:, 1] - 0.5 * x[:, 4] + rng.normal(0, 0.5, 400) > 0).astype(int)
    return x, y


def _export(model: Any, x: np.ndarray) -> Trained:
    onx = to_onnx(model, x[:1], options={"zipmap": False}, target_opset=17)
    return Trained(model, onx.SerializeToString())


@pytest.fixture(scope="module")
def logreg(data: tuple[np.ndarray, np.ndarray]) -> Trained:
    x, y = data
    return _export(LogisticRegression().fit(x, y), x)


@pytest.fixture(scope="module")
def gbdt(data: tuple[np.ndarray, np.ndarray]) -> Trained:
    x, y = data
    model = GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0)
    return _export(model.fit(x, y), x)


def card(features: list[str] | None = None, **override: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "ranker",
        "features": list(features or FEATURES),
        "input": "X",
        "output": "probabilities",
        "output_index": 1,
        "metrics": {"auc": 0.91, "recall_at_50": 0.4, "note": "not a number"},
        "training_data_hash": "sha256:abc123",
        "training": {"rows": 400},
        "framework": "sklearn",
    }
    base.update(override)
    return base


def batch(rows: int = 50, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, len(FEATURES))).astype(np.float32)


# --- registry on disk -----------------------------------------------------------------------


def test_publish_numbers_versions_and_completes_the_card(tmp_path: Path, logreg: Trained) -> None:
    versions = [publish_model(tmp_path, "ranker", logreg.onnx, card()) for _ in range(10)]
    assert versions == [f"v{i}" for i in range(1, 11)]
    written = json.loads((tmp_path / "ranker" / "v3" / "card.json").read_text())
    assert written["version"] == "v3"
    assert written["onnx_sha256"] == hashlib.sha256(logreg.onnx).hexdigest()
    assert written["created_at"].endswith("+00:00")
    assert written["features"] == FEATURES and written["training_data_hash"] == "sha256:abc123"
    assert (tmp_path / "ranker" / "v3" / "model.onnx").read_bytes() == logreg.onnx
    # No temp dirs are left behind, and v10 sorts after v9.
    assert sorted(p.name for p in (tmp_path / "ranker").iterdir()) == sorted(versions)
    assert published_versions(tmp_path) == {"ranker": versions}
    registry = ModelRegistry(tmp_path)
    assert registry.refresh() == []
    assert registry.get("ranker").version == "v10"


def test_publish_refuses_bad_models_and_cards(tmp_path: Path, logreg: Trained) -> None:
    with pytest.raises(RegistryError, match="lists 4 features but model input 'X' is 5 wide"):
        publish_model(tmp_path, "ranker", logreg.onnx, card(FEATURES[:4]))
    with pytest.raises(RegistryError, match="missing output_index"):
        publish_model(
            tmp_path,
            "ranker",
            logreg.onnx,
            {"features": FEATURES, "input": "X", "output": "probabilities"},
        )
    with pytest.raises(
        RegistryError,
        match=r"card output 'score' is not a model output \['label', 'probabilities'\]",
    ):
        publish_model(tmp_path, "ranker", logreg.onnx, card(output="score"))
    with pytest.raises(RegistryError, match="output_index 2 does not pick one score per row"):
        publish_model(tmp_path, "ranker", logreg.onnx, card(output_index=2))
    with pytest.raises(RegistryError, match="'label' is int64, not a float score"):
        publish_model(tmp_path, "ranker", logreg.onnx, card(output="label", output_index=0))
    with pytest.raises(RegistryError, match="onnxruntime cannot load it"):
        publish_model(tmp_path, "ranker", b"not an onnx model", card())
    with pytest.raises(RegistryError, match=r"model name '\.\./x' is invalid"):
        publish_model(tmp_path, "../x", logreg.onnx, card())
    assert published_versions(tmp_path) == {}


def test_latest_and_pinned_versions(tmp_path: Path, logreg: Trained, gbdt: Trained) -> None:
    publish_model(tmp_path, "ranker", logreg.onnx, card())
    publish_model(tmp_path, "ranker", gbdt.onnx, card(framework="sklearn-gbdt"))
    registry = ModelRegistry(tmp_path)
    registry.refresh()
    x = batch()
    for latest in (None, "", "latest"):
        assert registry.get("ranker", latest).version == "v2"
    np.testing.assert_allclose(registry.get("ranker").score(x, FEATURES), gbdt.proba(x), atol=1e-5)
    np.testing.assert_allclose(
        registry.get("ranker", "v1").score(x, FEATURES), logreg.proba(x), atol=1e-5
    )
    assert [m.version for m in registry.models()] == ["v1", "v2"]
    assert registry.is_latest(registry.get("ranker", "v2"))
    with pytest.raises(
        ModelNotFoundError, match=r"no loaded version 'v7' .* loaded versions: v1, v2"
    ):
        registry.get("ranker", "v7")
    with pytest.raises(
        ModelNotFoundError,
        match=rf"'nope' is not loaded from the registry at {tmp_path}; "
        r"loaded models: ranker \(v1, v2\)",
    ):
        registry.get("nope")


def test_columns_are_matched_by_name(tmp_path: Path, gbdt: Trained) -> None:
    publish_model(tmp_path, "ranker", gbdt.onnx, card())
    registry = ModelRegistry(tmp_path)
    registry.refresh()
    model = registry.get("ranker")
    x = batch(200)
    expected = gbdt.proba(x)
    order = [3, 0, 4, 2, 1]
    shuffled = np.hstack([x[:, order], np.full((200, 1), 99.0, dtype=np.float32)])
    columns = [FEATURES[i] for i in order] + ["unused_extra"]
    for _ in range(2):  # the second call uses the cached column index
        got = model.score(shuffled, columns)
        assert got.dtype == np.float32 and got.shape == (200,)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert model.score(np.zeros((0, 5), np.float32), FEATURES).shape == (0,)
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['jaccard'\] that model ranker v1 needs"
    ):
        model.score(np.delete(x, 2, axis=1), [f for f in FEATURES if f != "jaccard"])
    with pytest.raises(ValueError, match="does not match 4 column names"):
        model.score(x, FEATURES[:4])


def test_corrupt_or_mismatched_files_are_refused_and_old_versions_keep_serving(
    tmp_path: Path, logreg: Trained, gbdt: Trained
) -> None:
    publish_model(tmp_path, "ranker", logreg.onnx, card())
    publish_model(tmp_path, "ranker", gbdt.onnx, card())
    registry = ModelRegistry(tmp_path)
    assert registry.refresh() == []
    x = batch()

    # An already-loaded file overwritten with garbage: refused, the loaded session keeps serving.
    v1_file = tmp_path / "ranker" / "v1" / "model.onnx"
    v1_file.write_bytes(b"\x00garbage" * 50)
    errors = registry.refresh()
    assert len(errors) == 1 and str(v1_file) in errors[0]
    assert "does not match the card's onnx_sha256" in errors[0]
    assert "still serving ranker v1" in errors[0]
    np.testing.assert_allclose(
        registry.get("ranker", "v1").score(x, FEATURES), logreg.proba(x), atol=1e-5
    )

    # A new version whose bytes are not ONNX (with a card that matches them): refused.
    v3 = tmp_path / "ranker" / "v3"
    v3.mkdir()
    garbage = b"definitely not protobuf" * 10
    (v3 / "model.onnx").write_bytes(garbage)
    (v3 / "card.json").write_text(
        json.dumps(card(version="v3", onnx_sha256=hashlib.sha256(garbage).hexdigest()))
    )
    # A new version whose card lists the wrong number of features: refused.
    v4 = tmp_path / "ranker" / "v4"
    v4.mkdir()
    (v4 / "model.onnx").write_bytes(gbdt.onnx)
    (v4 / "card.json").write_text(
        json.dumps(
            card(FEATURES[:3], version="v4", onnx_sha256=hashlib.sha256(gbdt.onnx).hexdigest())
        )
    )
    errors = registry.refresh()
    assert len(errors) == 3
    assert any(str(v3 / "model.onnx") in e and "onnxruntime cannot load it" in e for e in errors)
    assert any(
        str(v4 / "model.onnx") in e and "lists 3 features but model input 'X' is 5 wide" in e
        for e in errors
    )
    assert registry.get("ranker").version == "v2"  # latest = highest *loaded* version
    with pytest.raises(
        ModelNotFoundError, match=r"'v3' .* it failed to load: .*onnxruntime cannot load it"
    ):
        registry.get("ranker", "v3")
    # Failures are remembered until the files change, so refresh does not retry them.
    assert registry.refresh() == errors

    # Repairing the files heals the registry on the next refresh.
    v1_file.write_bytes(logreg.onnx)
    (v4 / "card.json").write_text(
        json.dumps(card(version="v4", onnx_sha256=hashlib.sha256(gbdt.onnx).hexdigest()))
    )
    errors = registry.refresh()
    assert len(errors) == 1 and str(v3) in errors[0]
    assert registry.get("ranker").version == "v4"
    np.testing.assert_allclose(
        registry.get("ranker", "v1").score(x, FEATURES), logreg.proba(x), atol=1e-5
    )


def test_a_version_whose_files_change_reloads(
    tmp_path: Path, logreg: Trained, gbdt: Trained
) -> None:
    publish_model(tmp_path, "ranker", logreg.onnx, card())
    registry = ModelRegistry(tmp_path)
    registry.refresh()
    before = registry.get("ranker", "v1")
    vdir = tmp_path / "ranker" / "v1"
    (vdir / "card.json").write_text(
        json.dumps(card(version="v1", onnx_sha256=hashlib.sha256(gbdt.onnx).hexdigest()))
    )
    (vdir / "model.onnx").write_bytes(gbdt.onnx)
    assert registry.refresh() == []
    after = registry.get("ranker", "v1")
    assert after is not before
    x = batch()
    np.testing.assert_allclose(after.score(x, FEATURES), gbdt.proba(x), atol=1e-5)
    # Touching a file without changing it keeps the warm session.
    (vdir / "model.onnx").write_bytes(gbdt.onnx)
    assert registry.refresh() == [] and registry.get("ranker", "v1") is after
    # A removed version stops serving.
    publish_model(tmp_path, "ranker", logreg.onnx, card())
    registry.refresh()
    assert registry.get("ranker").version == "v2"
    for f in (tmp_path / "ranker" / "v2").iterdir():
        f.unlink()
    (tmp_path / "ranker" / "v2").rmdir()
    registry.refresh()
    assert registry.get("ranker").version == "v1"


# --- the service over real gRPC -------------------------------------------------------------


@asynccontextmanager
async def serving(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, reload_s: float = 0.05
) -> AsyncIterator[scoring_pb2_grpc.ScoringServiceStub]:
    monkeypatch.setenv("EDGEFLOW_MODEL_DIR", str(model_dir))
    service = ScoringService(Config(home=model_dir.parent, reload_interval_s=reload_s))
    server, port, health_servicer = await start_server(service, "127.0.0.1:0")
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            yield scoring_pb2_grpc.ScoringServiceStub(ch)
    finally:
        await drain(service, server, health_servicer)


def request(
    x: np.ndarray, columns: list[str], model: str = "ranker", version: str = ""
) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(model=model, version=version, features=tensor.pack(x, columns))


async def test_hot_reload_picks_up_a_new_version_while_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logreg: Trained, gbdt: Trained
) -> None:
    model_dir = tmp_path / "models"
    publish_model(model_dir, "ranker", logreg.onnx, card())
    x = batch(500)
    async with serving(model_dir, monkeypatch) as stub:
        reply = await stub.Score(request(x, FEATURES))
        assert (reply.model, reply.version) == ("ranker", "v1")
        assert list(reply.scores.columns) == ["score"] and reply.scores.rows == 500
        np.testing.assert_allclose(tensor.unpack(reply.scores)[:, 0], logreg.proba(x), atol=1e-5)

        publish_model(model_dir, "ranker", gbdt.onnx, card(metrics={"auc": 0.95}))
        for _ in range(400):  # the reload loop runs every 0.05 s
            reply = await stub.Score(request(x, FEATURES))
            if reply.version == "v2":
                break
            await asyncio.sleep(0.025)
        assert reply.version == "v2"
        np.testing.assert_allclose(tensor.unpack(reply.scores)[:, 0], gbdt.proba(x), atol=1e-5)
        pinned = await stub.Score(request(x, FEATURES, version="v1"))
        np.testing.assert_allclose(tensor.unpack(pinned.scores)[:, 0], logreg.proba(x), atol=1e-5)

        listed = await stub.ListModels(scoring_pb2.ListModelsRequest())
        assert [(m.name, m.version, m.latest) for m in listed.models] == [
            ("ranker", "v1", False),
            ("ranker", "v2", True),
        ]
        v1, v2 = listed.models
        assert list(v1.features) == FEATURES and v1.training_data_hash == "sha256:abc123"
        assert dict(v1.metrics) == pytest.approx({"auc": 0.91, "recall_at_50": 0.4})
        assert dict(v2.metrics) == pytest.approx({"auc": 0.95})


async def test_errors_over_the_wire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gbdt: Trained
) -> None:
    model_dir = tmp_path / "models"
    publish_model(model_dir, "ranker", gbdt.onnx, card())
    x = batch(20)
    async with serving(model_dir, monkeypatch) as stub:

        async def status(req: scoring_pb2.ScoreRequest) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Score(req)
            return info.value.code(), info.value.details() or ""

        code, msg = await status(request(x, FEATURES, model="missing"))
        assert code == grpc.StatusCode.NOT_FOUND
        assert f"'missing' is not loaded from the registry at {model_dir}" in msg
        assert "loaded models: ranker (v1)" in msg
        code, msg = await status(request(x, FEATURES, version="v9"))
        assert code == grpc.StatusCode.NOT_FOUND and "no loaded version 'v9'" in msg

        code, msg = await status(request(x[:, :4], FEATURES[:4]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing column(s) ['embedding_cosine'] that model ranker v1 needs" in msg

        bad = request(x, FEATURES)
        bad.features.data = bad.features.data[:-4]
        code, msg = await status(bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "tensor data is 396 bytes but shape 20x5 needs 400" in msg

        nameless = request(x, FEATURES)
        del nameless.features.columns[:]
        code, msg = await status(nameless)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "it has no column names" in msg

        code, msg = await status(request(x, FEATURES, model=""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "ScoreRequest.model is empty" in msg

        # NaN inputs pass through: tree models route missing values.
        with_nan = x.copy()
        with_nan[::3, 1] = np.nan
        reply = await stub.Score(request(with_nan, FEATURES))
        assert reply.scores.rows == 20 and np.isfinite(tensor.unpack(reply.scores)).all()


async def test_health_is_not_serving_until_start_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logreg: Trained
) -> None:
    model_dir = tmp_path / "models"
    publish_model(model_dir, "ranker", logreg.onnx, card())
    monkeypatch.setenv("EDGEFLOW_MODEL_DIR", str(model_dir))
    gate, entered = asyncio.Event(), asyncio.Event()

    class GatedScoring(ScoringService):
        async def start(self) -> None:
            entered.set()
            await gate.wait()
            await super().start()

    service = GatedScoring(Config(home=tmp_path, reload_interval_s=0))
    port = free_port()
    health_servicer = health.aio.HealthServicer()
    starting = asyncio.create_task(start_server(service, f"127.0.0.1:{port}", health_servicer))
    async with channel(f"127.0.0.1:{port}") as ch:
        probe = health_pb2_grpc.HealthStub(ch)
        check = health_pb2.HealthCheckRequest(service=SERVICE)
        await asyncio.wait_for(entered.wait(), 30)
        reply = await probe.Check(check)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert service.registry.models() == []
        gate.set()
        server, _, _ = await starting
        try:
            reply = await probe.Check(check)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert [m.version for m in service.registry.models()] == ["v1"]
        finally:
            await drain(service, server, health_servicer)


# --- rollout: stable and canary --------------------------------------------------------------


async def test_a_canary_takes_its_share_of_members_until_promoted_or_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logreg: Trained, gbdt: Trained
) -> None:
    """`edgeflow models canary/promote/rollback` through the real CLI, applied by a serving
    scoring process on its next scan: the canary gets about its share of members, always the
    same ones; a version published later takes no traffic; batch callers get stable."""
    model_dir = tmp_path / "models"
    for onnx in (logreg.onnx, gbdt.onnx, logreg.onnx):
        publish_model(model_dir, "ranker", onnx, card())
    x = batch(20)

    def models(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeflow.cli.main", "models", *argv,
             "--model-dir", str(model_dir)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    async def versions(stub: scoring_pb2_grpc.ScoringServiceStub, members: range) -> list[str]:
        out = []
        for m in members:
            req = request(x, FEATURES)
            req.member = m
            out.append((await stub.Score(req)).version)
        return out

    async def settled(stub: scoring_pb2_grpc.ScoringServiceStub, want: set[str]) -> list[str]:
        for _ in range(200):  # the reload loop runs every 0.05 s
            got = await versions(stub, range(400))
            if set(got) == want:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError(f"versions served stayed {sorted(set(got))}, not {sorted(want)}")

    async with serving(model_dir, monkeypatch) as stub:
        assert set(await versions(stub, range(50))) == {"v3"}  # no aliases: the newest
        done = models("canary", "ranker", "v3", "--share", "0.25")
        assert done.returncode == 0, done.stderr
        assert "ranker: stable v2, canary v3 for 25.0% of members" in done.stdout
        await settled(stub, {"v2", "v3"})
        first = await versions(stub, range(400))  # every request after the scan
        assert 0.17 < first.count("v3") / len(first) < 0.33
        assert await versions(stub, range(400)) == first  # sticky per member
        assert (await stub.Score(request(x, FEATURES))).version == "v2"  # no member: stable
        assert (await stub.Score(request(x, FEATURES, version="canary"))).version == "v3"
        listed = await stub.ListModels(scoring_pb2.ListModelsRequest())
        assert [(m.version, list(m.aliases), round(m.traffic_share, 2))
                for m in listed.models] == [("v1", [], 0.0), ("v2", ["stable"], 0.75),
                                            ("v3", ["canary"], 0.25)]  # fmt: skip

        publish_model(model_dir, "ranker", gbdt.onnx, card())  # v4: no traffic of its own
        assert models("promote", "ranker").returncode == 0
        await settled(stub, {"v3"})
        table = models("list").stdout
        assert re.search(r"ranker\s+v3\s+stable\s+100.0%", table), table
        assert re.search(r"ranker\s+v4\s+-\s+0.0%", table), table

        assert models("rollback", "ranker").returncode == 0  # no canary: stable v2 again
        await settled(stub, {"v2"})
        again = models("rollback", "ranker")
        assert again.returncode == 2
        assert "no canary and no earlier stable version to roll back to" in again.stderr

        (model_dir / "ranker" / "aliases.json").write_text('{"stable": "v9"}')
        for _ in range(100):
            listed = await stub.ListModels(scoring_pb2.ListModelsRequest())
            if not any(m.traffic_share == 1.0 and m.version == "v2" for m in listed.models):
                break
            await asyncio.sleep(0.05)
        # A broken file keeps the aliases read before and says why.
        assert set(await versions(stub, range(50))) == {"v2"}
        bad = models("list")
        assert bad.returncode == 2
        assert (
            "stable 'v9' is not a loaded version of ranker (loaded: v1, v2, v3, v4)" in bad.stderr
        )


def test_rollout_commands_name_what_is_wrong(tmp_path: Path, logreg: Trained) -> None:
    model_dir = tmp_path / "models"
    publish_model(model_dir, "ranker", logreg.onnx, card())
    versions = published_versions(model_dir)["ranker"]
    with pytest.raises(RolloutError, match="is the only version: there is no stable one"):
        set_canary(model_dir, "ranker", versions, "v1", 0.1)
    with pytest.raises(RolloutError, match=r"no version 'v7' .* \(published: v1\)"):
        set_canary(model_dir, "ranker", versions, "v7", 0.1)
    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(RolloutError, match=r"--share must be in \(0, 1\]"):
            set_canary(model_dir, "ranker", versions, "v1", share)
    with pytest.raises(RolloutError, match="has no canary to promote"):
        promote(model_dir, "ranker", versions)
    with pytest.raises(RolloutError, match="has no published version"):
        promote(model_dir, "other", [])
    registry = ModelRegistry(tmp_path / "models")
    registry.refresh()
    with pytest.raises(ModelNotFoundError, match="has no canary"):
        registry.get("ranker", "canary")
    assert registry.get("ranker", "stable").version == "v1"
    (model_dir / "ranker" / "aliases.json").write_text("[1]")
    assert registry.refresh() == [
        f"{model_dir / 'ranker' / 'aliases.json'}: must be a JSON object, got list "
        "(serving the newest version)"
    ]
    assert registry.get("ranker").version == "v1"
