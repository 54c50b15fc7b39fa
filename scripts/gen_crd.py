"""Regenerate the EdgeWorkflow CRD from the workflow model (pydantic) and the ops registry.

Run: python scripts/gen_crd.py [--check]   (--check: exit 1 if the checked-in CRD is stale)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeflow_operator.crd import render_crd

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "charts" / "edgeflow" / "crds" / "edgeworkflows.edgeflow.dev.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, do not write")
    args = parser.parse_args()
    text = render_crd()
    if args.check:
        current = CRD_FILE.read_text(encoding="utf-8") if CRD_FILE.exists() else ""
        if current != text:
            print(f"{CRD_FILE.relative_to(ROOT)} is stale: run python scripts/gen_crd.py")
            return 1
        return 0
    CRD_FILE.parent.mkdir(parents=True, exist_ok=True)
    CRD_FILE.write_text(text, encoding="utf-8")
    print(CRD_FILE.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
