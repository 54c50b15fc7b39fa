#!/usr/bin/env bash
# Regenerate the lock files in requirements/ from pyproject.toml and requirements/*.in.
#   scripts/lock.sh                  keep every locked version that still satisfies the inputs
#   scripts/lock.sh --upgrade        move everything to the newest versions the inputs allow
#   scripts/lock.sh --upgrade-package grpcio   move one package (repeatable)
# Then run scripts/test.sh (it installs exactly what the locks say) and commit requirements/.
# grpcio, grpcio-tools and protobuf move together: after a grpcio upgrade, regenerate the
# protobuf package (.venv/bin/python scripts/gen_protos.py) and commit it too.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/uv.sh
compile() {
  "$UV" pip compile --quiet --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --no-header --no-annotate "$@"
}
# dev.lock first: the others take their versions from it.
compile pyproject.toml requirements/build.in --extra serve --extra dev -o requirements/dev.lock "$@"
compile pyproject.toml requirements/build.in --extra serve -c requirements/dev.lock \
  -o requirements/runtime.lock
# The operator image: pyproject's base dependencies alone, without the `serve` extra.
compile pyproject.toml requirements/build.in -c requirements/dev.lock -o requirements/operator.lock
sklearn=$(grep -o '^scikit-learn==[^ ]*' requirements/dev.lock)
compile requirements/oip-peers.in --constraint <(echo "$sklearn") -o requirements/oip-peers.lock "$@"
echo "locked: $(ls requirements/*.lock | tr '\n' ' ')"
