"""`edgeflow auth`: API keys for the gateway (edgeflow.shell.auth)."""

from __future__ import annotations

import argparse
import json

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.shell import auth


def run(args: argparse.Namespace) -> int:
    path = args.keys_file or config.load().keys_path
    try:
        if args.action == "create-key":
            # Only the key on stdout, so `KEY=$(edgeflow auth create-key ...)` works.
            print(auth.create_key(path, args.scopes.split(","), name=args.name))
            return 0
        auth.read_keys(path)  # a malformed file is named, not half-listed
    except auth.AuthError as exc:
        raise CliError(str(exc)) from None
    try:
        entries = json.loads(path.read_text()).get("keys", [])
    except FileNotFoundError:
        entries = []
    if not entries:
        print(f"no keys in {path}")
    for e in entries:
        print(f"{e.get('id', '?'):10} {','.join(e.get('scopes', [])):30} "
              f"{e.get('created', ''):27} {e.get('name', '')}")  # fmt: skip
    return 0
