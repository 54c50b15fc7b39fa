"""A/B experiments: exposure and outcome records, shadow comparisons and the analysis behind
`edgeflow experiments report` (members are assigned to variants by edgeflow.workflow.assign)."""
