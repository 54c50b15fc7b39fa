"""Workflow graphs: the EdgeWorkflow model (model.py), its ops (ops.py), validation
(validate.py) into the compiled graph the executors run (compiled.py), and the sticky
assignment of members to experiment variants (assign.py); shared by the CLI, the gateway,
the offline and nearline executors and the operator."""
