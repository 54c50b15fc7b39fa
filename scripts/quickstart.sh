#!/usr/bin/env bash
# The newcomer's command: set up, then ingest a graph, train, start the suite and recommend.
#   scripts/quickstart.sh [EDGE_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/edgeflow quickstart --edges "$1"
fi
exec .venv/bin/edgeflow quickstart
