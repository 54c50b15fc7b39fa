"""Bounds on a workflow document, checked before and while it is parsed.

A workflow file, or an EdgeWorkflow the operator receives, is untrusted input: a file of
20,000 nested `[` must be refused with a message naming it, not crash the gateway (Python's
recursion limit) or cost it seconds of CPU. So:

- a file is at most MAX_FILE_BYTES (a ConfigMap's limit), checked before it is read;
- YAML is composed by `load_yaml`, which refuses nesting deeper than MAX_DEPTH and more than
  MAX_NODES nodes (aliases counted as what they expand to, so `&a`/`*a` "billion laughs"
  documents are refused too) as soon as the parser reaches them;
- a document that did not come from YAML (the operator's) is checked by `check_nesting`,
  without recursion;
- messages quote at most a short prefix of what the user wrote (`clip`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

MAX_FILE_BYTES: Final = 1024 * 1024
# A workflow's deepest legitimate nesting is about 8 (spec.experiments[].variants[].overrides
# .nodes[].params.weights.<name>); params may nest a little more.
MAX_DEPTH: Final = 32
# Scalars, sequences and mappings; the largest legitimate document is dominated by allow
# lists (8 experiments x 10,000 members).
MAX_NODES: Final = 200_000
# How much of a value a message quotes.
QUOTE_CHARS: Final = 64

try:  # libyaml's parser (C) when PyYAML has it: 4-5 times faster than the Python one
    from yaml._yaml import CParser as _Parser  # type: ignore[import-not-found, unused-ignore]

    _C = True
except ImportError:  # pragma: no cover - PyYAML without libyaml
    _C = False


class LimitError(ValueError):
    """A document beyond the limits; the message says which limit and where."""


if _C:

    class _Base(Composer, _Parser, SafeConstructor, Resolver):  # type: ignore[misc, valid-type, unused-ignore]
        def __init__(self, stream: str) -> None:
            _Parser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

else:  # pragma: no cover
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Base(Reader, Scanner, Parser, Composer, SafeConstructor, Resolver):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


class _BoundedLoader(_Base):  # type: ignore[misc, valid-type, unused-ignore]
    """PyYAML's safe loader with a composer that keeps depth and size within the limits.

    Composer is first in the bases, so its Python `compose_node` (overridden here) runs even
    over libyaml's parser: the parser stays C, the limits are checked per node."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        # Per composed collection or scalar: (nodes it expands to, its height).
        self._shape: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        alias = self.check_event(AliasEvent)
        event: Any = self.peek_event()
        mark: Any = event.start_mark
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels (the limit)", mark
                )
            node: Any = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            count, height = self._shape.get(id(node), (1, 1))
            if self._depth + height > MAX_DEPTH:
                raise ComposerError(
                    None, None, f"an alias nests deeper than {MAX_DEPTH} levels (the limit)", mark
                )
        else:
            count, height = 1, 1
            if isinstance(node, SequenceNode):
                for child in node.value:
                    c, h = self._shape.get(id(child), (1, 1))
                    count, height = count + c, max(height, h + 1)
            elif isinstance(node, MappingNode):
                for key, value in node.value:
                    for child in (key, value):
                        c, h = self._shape.get(id(child), (1, 1))
                        count, height = count + c, max(height, h + 1)
            self._shape[id(node)] = (count, height)
            count = 1  # the children counted themselves when they were composed
        self._nodes += count
        if self._nodes > MAX_NODES:
            raise ComposerError(
                None, None, f"more than {MAX_NODES} YAML nodes (the limit; aliases count "
                "as what they expand to)", mark,
            )  # fmt: skip
        return node


def load_yaml(text: str) -> list[Any]:
    """The documents of a YAML text, within the limits; raises yaml.YAMLError otherwise."""
    if len(text) > MAX_FILE_BYTES:
        raise LimitError(f"larger than {MAX_FILE_BYTES} bytes (the limit)")
    loader = _BoundedLoader(text)
    try:
        out = []
        while loader.check_data():
            out.append(loader.get_data())
        return out
    finally:
        loader.dispose()


def read_text(path: Any) -> str:
    """A workflow file's text, refusing a file over MAX_FILE_BYTES before reading it all."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise LimitError(f"larger than {MAX_FILE_BYTES} bytes (the limit)")
    return data.decode("utf-8")


def check_nesting(doc: Any) -> None:
    """Refuse a parsed document (the operator's, from the API server) that nests deeper than
    MAX_DEPTH or holds more than MAX_NODES values; iterative, so depth cannot overflow."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise LimitError(f"more than {MAX_NODES} values (the limit)")
        if depth > MAX_DEPTH:
            raise LimitError(f"nested deeper than {MAX_DEPTH} levels (the limit)")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


def clip(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to a short prefix that says how long the whole was."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<int of {value.bit_length()} bits>"
    if not isinstance(value, str | int | float | bool | None):
        text = f"<{type(value).__name__}>"
        if isinstance(value, list | tuple | Mapping):
            text = f"<{type(value).__name__} of {len(value)}>"
        return text
    return repr(value)


def clip_text(text: str, limit: int) -> str:
    """A message cut to `limit` characters, saying so."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 30]}... ({len(text) - limit + 30} more characters)"
