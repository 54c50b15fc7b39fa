#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Test-only peers and tools, kept out of the runtime environment (into .cache/):
.venv/bin/python scripts/install_k8s_tools.py  # helm for the chart tests
scripts/setup_oip_peers.sh  # MLServer and tritonclient for the OIP tests
# Two workers (one per core on the reference machine), each taking whole test files so a
# module's fixtures are built once, in the order tests/conftest.py gives (longest first);
# EDGEFLOW_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -q --durations=15 -n "${EDGEFLOW_TEST_WORKERS:-2}" \
  --dist loadfile --no-loadscope-reorder "$@"
