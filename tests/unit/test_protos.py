"""The generated package services/edgeflow/v1 must be exactly what protos/ generates."""

from __future__ import annotations

import importlib.util
import re
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


# The generator stamps its own release into the code. A patch release of grpcio-tools or
# protobuf changes only these stamps; the runtime checks them (the locks keep all three on one
# release), so the comparison of content leaves them out.
_STAMPS = [
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"ValidateProtobufRuntimeVersion\(\n(?:\s+.*\n){4}", re.M),
]


def _content(path: Path) -> str:
    text = path.read_text()
    for stamp in _STAMPS:
        text = stamp.sub("<stamp>", text)
    return text


def test_only_version_stamps_are_left_out_of_the_comparison(tmp_path: Path) -> None:
    for original in (GENERATED / "candidates_pb2_grpc.py", GENERATED / "candidates_pb2.py"):
        text = original.read_text()
        bumped = re.sub(r"'1\.(\d+)\.\d+'", r"'1.\1.999'", text)  # grpc stamp
        bumped = re.sub(r"Version: (\d+)\.(\d+)\.\d+", r"Version: \1.\2.999", bumped)
        bumped = re.sub(r"(Domain\.PUBLIC,\n\s+\d+,\n\s+\d+,\n\s+)\d+,", r"\g<1>999,", bumped)
        assert bumped != text, original.name
        copy = tmp_path / original.name
        copy.write_text(bumped)
        assert _content(copy) == _content(original), original.name
        copy.write_text(bumped.replace("edgeflow", "edgeflaw", 1))
        assert _content(copy) != _content(original), original.name


def test_generated_package_matches_protos(tmp_path: Path) -> None:
    fresh = _generate(tmp_path)
    expected = _generated(fresh)
    committed = _generated(GENERATED)
    assert committed == expected, "run: python scripts/gen_protos.py"
    stale = [n for n in expected if _content(fresh / n) != _content(GENERATED / n)]
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
