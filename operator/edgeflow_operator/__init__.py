"""The edgeflow operator: EdgeWorkflow custom resources into running parts (kopf)."""

GROUP = "edgeflow.dev"
VERSION = "v1alpha1"
PLURAL = "edgeworkflows"
KIND = "EdgeWorkflow"
