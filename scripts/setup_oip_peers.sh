#!/usr/bin/env bash
# Idempotent: a separate virtual environment with the real Open Inference Protocol peers the
# tests run against: MLServer (+ its scikit-learn runtime) as a remote model server and
# Triton's Python client, installed exactly as requirements/oip-peers.lock says. They pin
# protobuf below the release line edgeflow's generated code needs, so they cannot share .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=.cache/oip-peers
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

source scripts/uv.sh
want="$(sha256sum requirements/oip-peers.lock | cut -d' ' -f1)"
stamp="$PEERS/.edgeflow-installed"
if [ -x "$PEERS/bin/mlserver" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "installing the OIP test peers (MLServer, tritonclient) into $PEERS (requirements/oip-peers.lock)"
rm -rf "$PEERS"
"$UV" venv --quiet --python "$PYTHON" "$PEERS"
timeout 900 "$UV" pip sync --quiet --python "$PEERS/bin/python" --require-hashes \
  requirements/oip-peers.lock
echo "$want" >"$stamp"
