"""`edgeflow validate FILE...`: check workflow graphs the way the gateway and operator do."""

from __future__ import annotations

import argparse
import sys

from edgeflow.workflow.validate import WorkflowError, load_workflow


def run(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            wf = load_workflow(path)
        except WorkflowError as exc:
            failed += 1
            print(exc, file=sys.stderr)
            continue
        ops = ", ".join(f"{n.node.name} ({n.node.op})" for n in wf.nodes)
        print(f"{path}: valid workflow {wf.name!r} for surface {wf.surface!r}: {ops}")
    return 1 if failed else 0
