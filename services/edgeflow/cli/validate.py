"""`edgeflow validate FILE...`: check workflow graphs the way the gateway and operator do."""

from __future__ import annotations

import argparse
import sys

from edgeflow.workflow.validate import WorkflowError, check_models, load_workflow


def run(args: argparse.Namespace) -> int:
    available = None
    if args.model_dir is not None:
        from edgeflow.scoring.registry import published_versions
        from edgeflow.scoring.rollout import RolloutError, read_aliases

        available = published_versions(args.model_dir)
        for name, versions in available.items():  # "canary" exists while one is set
            try:
                aliases = read_aliases(args.model_dir, name, set(versions))
            except RolloutError:
                continue  # scoring reports the file; the canary is not available
            if aliases is not None and aliases.canary is not None:
                versions.append("canary")
    failed = 0
    for path in args.files:
        try:
            wf = load_workflow(path)
            if available is not None and (problems := check_models(wf, available)):
                raise WorkflowError(str(path), problems)
        except WorkflowError as exc:
            failed += 1
            print(exc, file=sys.stderr)
            continue
        ops = ", ".join(f"{n.node.name} ({n.node.op})" for n in wf.nodes)
        print(f"{path}: valid workflow {wf.name!r} for surface {wf.surface!r}: {ops}")
        for exp in wf.spec.experiments:
            split = ", ".join(f"{v.name} {v.weight:g}%" for v in exp.variants)
            target = exp.targeting
            who = f"{target.share:.0%} of members" if target.share < 1 else "all members"
            if target.allow_list:
                who += f" in an allow-list of {len(target.allow_list)}"
            print(f"  experiment {exp.name}: {who}; {split}; control {exp.control_variant}")
        for shadow in wf.spec.shadows:
            print(f"  shadow {shadow.name}: {shadow.share:.0%} of requests, not served")
    return 1 if failed else 0
