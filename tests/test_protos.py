"""The generated package services/edgeflow/v1 must be exactly what protos/ generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgeflow.config import REPO_ROOT

GENERATED = REPO_ROOT / "services" / "edgeflow" / "v1"


def _generate(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location(
        "gen_protos", REPO_ROOT / "scripts" / "gen_protos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(out)
    return out / "edgeflow" / "v1"


def _generated(root: Path) -> list[str]:
    """Generated files under root, subpackages (edgeflow.v1.inference) included."""
    found = [*root.rglob("*_pb2.py"), *root.rglob("*_pb2.pyi"), *root.rglob("*_pb2_grpc.py")]
    return sorted(str(p.relative_to(root)) for p in found)


def test_generated_package_matches_protos(tmp_path: Path) -> None:
    fresh = _generate(tmp_path)
    expected = _generated(fresh)
    committed = _generated(GENERATED)
    assert committed == expected, "run: python scripts/gen_protos.py"
    stale = [n for n in expected if (fresh / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert stale == [], f"stale generated files {stale}: run python scripts/gen_protos.py"


def test_every_service_api_is_declared_once() -> None:
    protos = sorted((REPO_ROOT / "protos" / "edgeflow" / "v1").glob("*.proto"))
    services = [line.split()[1] for p in protos for line in p.read_text().splitlines()
                if line.startswith("service ")]  # fmt: skip
    assert sorted(services) == sorted(
        ["CandidateService", "FeatureService", "ScoringService", "MergingService", "Recommender"]
    )
    messages = [line.split()[1] for p in protos for line in p.read_text().splitlines()
                if line.startswith("message ")]  # fmt: skip
    assert len(messages) == len(set(messages)), "a message is declared twice"
