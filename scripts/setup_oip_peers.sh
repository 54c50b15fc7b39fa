#!/usr/bin/env bash
# Idempotent: a separate virtual environment with the real Open Inference Protocol peers the
# tests run against: MLServer (+ its scikit-learn runtime) as a remote model server and
# Triton's Python client. They pin protobuf below the release line edgeflow's generated code
# needs, so they cannot share .venv. Reinstalled only when the pins below change.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=.cache/oip-peers
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# Models are trained in .venv and loaded by MLServer with joblib: same scikit-learn line.
sklearn=$(grep -o '"scikit-learn==[^"]*"' pyproject.toml | tr -d '"')
requirements=("mlserver==1.7.*" "mlserver-sklearn==1.7.*" "tritonclient[grpc]==2.*" "$sklearn")
want="$(printf '%s\n' "${requirements[@]}" | sort)"
stamp="$PEERS/.edgeflow-installed"
if [ -x "$PEERS/bin/mlserver" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "installing the OIP test peers (MLServer, tritonclient) into $PEERS (about a minute)"
rm -rf "$PEERS"
mkdir -p .cache
"$PYTHON" -m venv "$PEERS"
timeout 900 "$PEERS/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}"
printf '%s\n' "$want" >"$stamp"
