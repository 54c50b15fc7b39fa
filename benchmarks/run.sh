#!/usr/bin/env bash
# Run the benchmarks and the quality evaluation on the Facebook graph; results go to results/.
#   benchmarks/run.sh [EDGE_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
edges="${1:-../shared/data/facebook_combined.txt}"
.venv/bin/edgeflow bench --edges "$edges" --json --out benchmarks/results/bench.json
.venv/bin/edgeflow eval --edges "$edges" --holdout 0.1 --k 50 --seed 0 --json \
  | tee benchmarks/results/eval.json
