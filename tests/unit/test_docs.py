"""What the README quotes from a file must agree with the file.

A fenced block right after `<!-- quotes: PATH -->` is an excerpt of PATH: every key it shows
must be in the file with the same value; it may leave keys and list items out. List items
that are mappings with a `name` are matched by name, others by position within the file's
list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeflow.config import REPO_ROOT

README = REPO_ROOT / "README.md"
_QUOTE = re.compile(r"<!-- quotes: (\S+) -->\n```(\w*)\n(.*?)\n```", re.S)


def quotes(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(3)) for m in _QUOTE.finditer(text)]


def differences(excerpt: Any, actual: Any, where: str = "") -> list[str]:
    """Where the excerpt says something the file does not."""
    if isinstance(excerpt, dict):
        if not isinstance(actual, dict):
            return [f"{where or '/'}: the file has {actual!r}, not a mapping"]
        found: list[str] = []
        for key, value in excerpt.items():
            if key not in actual:
                found.append(f"{where}/{key}: not in the file")
            else:
                found += differences(value, actual[key], f"{where}/{key}")
        return found
    if isinstance(excerpt, list):
        if not isinstance(actual, list):
            return [f"{where}: the file has {actual!r}, not a list"]
        if all(isinstance(i, dict) and "name" in i for i in excerpt):
            named = {i.get("name"): i for i in actual if isinstance(i, dict)}
            found = []
            for item in excerpt:
                if item["name"] not in named:
                    found.append(f"{where}[{item['name']}]: not in the file")
                else:
                    found += differences(item, named[item["name"]], f"{where}[{item['name']}]")
            return found
        if excerpt != actual:
            return [f"{where}: README says {excerpt!r}, the file has {actual!r}"]
        return []
    if excerpt != actual:
        return [f"{where}: README says {excerpt!r}, the file has {actual!r}"]
    return []


def compare(path: str, block: str) -> list[str]:
    document = yaml.safe_load((REPO_ROOT / path).read_text())
    excerpt = yaml.safe_load(block)
    # An excerpt may start at the top of the file or inside its spec.
    root = document if set(excerpt) <= set(document) else document.get("spec", {})
    return differences(excerpt, root)


def test_the_readme_marks_its_quotes() -> None:
    marked = {path for path, _ in quotes(README.read_text())}
    assert {"workflows/pymk.yaml", "workflows/catch-up.yaml", "examples/pymk-ab.yaml"} <= marked


@pytest.mark.parametrize("path,block", quotes(README.read_text()))
def test_every_quote_agrees_with_its_file(path: str, block: str) -> None:
    assert (REPO_ROOT / path).is_file(), f"README quotes {path}, which does not exist"
    assert compare(path, block) == [], f"README's excerpt of {path} differs"


def test_a_changed_value_is_caught(tmp_path: Path) -> None:
    (path, block), *_ = (q for q in quotes(README.read_text()) if q[0] == "workflows/pymk.yaml")
    excerpt = yaml.safe_load(block)
    fof = next(n for n in excerpt["spec"]["nodes"] if n["name"] == "fof")
    fof["params"]["limit"] += 1
    problems = compare(path, yaml.safe_dump(excerpt))
    assert problems and "fof" in problems[0] and "limit" in problems[0]
    excerpt["spec"]["nodes"].append({"name": "ghost", "op": "candidates.graph"})
    assert any("ghost" in p for p in compare(path, yaml.safe_dump(excerpt)))
