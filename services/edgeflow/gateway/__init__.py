"""The gateway: the edge-facing Recommend API and the workflow engine behind it."""
