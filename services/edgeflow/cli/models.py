"""`edgeflow models`: the registry's versions and their rollout (scoring/rollout.py).

The commands change `<model_dir>/<name>/aliases.json`; every scoring process applies it on
its next registry scan (EDGEFLOW_RELOAD_INTERVAL_S).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgeflow.cli import CliError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser("list", help="every published version with its aliases and traffic")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s = sub.add_parser("canary", help="send a share of members to a version")
    s.add_argument("name", help="model name")
    s.add_argument("version", help="the version to try, e.g. v4")
    s.add_argument("--share", type=float, required=True, help="share of members, in (0, 1]")
    s = sub.add_parser("promote", help="the canary becomes stable and takes every member")
    s.add_argument("name", help="model name")
    s = sub.add_parser(
        "rollback", help="drop the canary; without one, the previous stable version again"
    )
    s.add_argument("name", help="model name")
    for s in sub.choices.values():
        s.add_argument("--model-dir", type=Path, help="default: EDGEFLOW_MODEL_DIR")


def run(args: argparse.Namespace) -> int:
    from edgeflow import config
    from edgeflow.scoring import rollout
    from edgeflow.scoring.registry import published_versions

    model_dir: Path = args.model_dir or config.load().model_dir
    published = published_versions(model_dir)
    if args.action == "list":
        return _list(model_dir, published, args.json)
    versions = published.get(args.name, [])
    try:
        if args.action == "canary":
            now = rollout.set_canary(model_dir, args.name, versions, args.version, args.share)
        elif args.action == "promote":
            now = rollout.promote(model_dir, args.name, versions)
        else:
            now = rollout.rollback(model_dir, args.name, versions)
    except rollout.RolloutError as exc:
        raise CliError(str(exc)) from None
    canary = f", canary {now.canary} for {now.canary_share:.1%} of members" if now.canary else ""
    print(f"{args.name}: stable {now.stable}{canary}")
    print(f"  written to {rollout.aliases_path(model_dir, args.name)}; scoring applies it "
          "on its next registry scan")  # fmt: skip
    return 0


def _list(model_dir: Path, published: dict[str, list[str]], as_json: bool) -> int:
    from edgeflow.scoring import rollout

    rows: list[dict[str, Any]] = []
    for name, versions in sorted(published.items()):
        try:
            aliases = rollout.read_aliases(model_dir, name, set(versions))
        except rollout.RolloutError as exc:
            raise CliError(str(exc)) from None
        for version in versions:
            held, share = rollout.traffic(aliases, version, versions[-1])
            rows.append({"model": name, "version": version, "aliases": held, "share": share})
    if as_json:
        print(json.dumps({"model_dir": str(model_dir), "versions": rows}))
        return 0
    if not rows:
        print(f"no published models in {model_dir}")
        return 0
    print(f"{'model':<20} {'version':<8} {'aliases':<15} traffic")
    for r in rows:
        print(f"{r['model']:<20} {r['version']:<8} {','.join(r['aliases']) or '-':<15} "
              f"{r['share']:.1%}")  # fmt: skip
    return 0
