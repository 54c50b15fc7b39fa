"""Workflow graphs: the EdgeWorkflow model, its ops, validation and the sticky assignment of
members to experiment variants (shared by the CLI, the gateway and the operator)."""
