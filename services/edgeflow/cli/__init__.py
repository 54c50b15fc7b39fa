"""The `edgeflow` command line."""
