"""Workflow graphs: the EdgeWorkflow model, its ops and validation (shared by the CLI,
the gateway and the operator)."""
