"""Workflow graphs: the EdgeWorkflow model (model.py), its ops (ops.py), validation
(validate.py) into the compiled graph the executors run (compiled.py), what its offline and
nearline modes write and how a surface without online scoring is served (modes.py), and the
sticky assignment of members to experiment variants (assign.py). Shared by the CLI, the
gateway, the offline and nearline executors and the operator."""
