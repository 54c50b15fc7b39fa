"""A/B experiments: sticky assignment, exposure and outcome records, shadow comparisons and
the analysis behind `edgeflow experiments report`."""
