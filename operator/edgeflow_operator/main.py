"""`edgeflow operator`: run the kopf operator for EdgeWorkflow resources."""

from __future__ import annotations

import argparse
import importlib


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", action="append", default=[], dest="namespaces",
                   help="watch this namespace (repeatable; default: the pod's own namespace, "
                   "from POD_NAMESPACE)")  # fmt: skip
    p.add_argument("-A", "--all-namespaces", action="store_true",
                   help="watch every namespace (needs cluster-wide RBAC)")  # fmt: skip
    p.add_argument("--liveness", metavar="URL", default="http://0.0.0.0:8080/healthz",
                   help="serve kopf's liveness probe here (empty: none)")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    import kopf

    from edgeflow.cli import CliError
    from edgeflow_operator.config import ConfigError, load

    try:
        load()  # fail at start, with the file and the field, not at the first reconcile
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    namespaces = list(args.namespaces)
    if not namespaces and not args.all_namespaces:
        own = os.environ.get("POD_NAMESPACE", "").strip()
        if not own:
            raise CliError("say which namespaces to watch: --namespace NS, --all-namespaces, "
                           "or POD_NAMESPACE in the environment")  # fmt: skip
        namespaces = [own]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    importlib.import_module("edgeflow_operator.handlers")  # registers the handlers with kopf
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=[] if args.all_namespaces else namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0
