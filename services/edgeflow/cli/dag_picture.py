"""A picture of one request's workflow DAG as SVG, in pure Python (no graphviz needed).

Nodes are laid out in layers by topological depth (a node sits one layer below its deepest
input), ordered within a layer by where their inputs sit so that arrows cross less; an arrow
that skips layers passes through a slot reserved for it in each, never through a box. Each box
shows the node's name, op, items in -> out and duration, coloured by status; each arrow is
labelled with the items that flowed along it. Boxes are as wide as their longest text needs:
names are never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from edgeflow.v1 import gateway_pb2

BOX_W, BOX_H = 220, 78  # BOX_W: the narrowest box; wider when a name needs it
BOX_PAD = 10  # text inset from a box's left and right edges
# Width of a character in em, by font weight: generous, so that a box is wide enough for
# its text in Helvetica or Arial (about 0.5 em on average) and in the usual fallback,
# DejaVu Sans (about 0.6 em, bold 0.68).
CHAR_EM = {"normal": 0.62, "bold": 0.7}
DUMMY_W = 16  # the slot an arrow takes in a layer it passes through
PORT_GAP = 24  # between arrows at one box
GAP_X, GAP_Y = 40, 64
MARGIN, TITLE_H = 24, 56
# The root element's class: how `edgeflow explain` recognises a picture it wrote.
ROOT_CLASS = "edgeflow-explain-dag"

# status -> (fill, stroke)
COLOURS = {
    "ok": ("#e6f4ea", "#1e8e3e"),
    "fallback": ("#fef7e0", "#e37400"),
    "skipped": ("#f1f3f4", "#80868b"),
}
_OTHER = ("#fce8e6", "#d93025")


@dataclass(frozen=True)
class Box:
    node: gateway_pb2.NodeTrace
    x: float
    y: float


@dataclass
class Layout:
    boxes: dict[str, Box]
    # (input, node) -> the points its arrow passes: out of the input, through each layer it
    # skips (at a reserved slot, so it never crosses a box), into the node
    routes: dict[tuple[str, str], list[tuple[float, float]]]
    width: float
    height: float
    box_w: float = BOX_W


def depths(nodes: Sequence[gateway_pb2.NodeTrace]) -> dict[str, int]:
    """Topological depth of each node; inputs not in `nodes` are ignored, cycles cut."""
    by_name = {n.node: n for n in nodes}
    out: dict[str, int] = {}

    def depth(name: str, seen: frozenset[str]) -> int:
        if name in out:
            return out[name]
        ins = [i for i in by_name[name].inputs if i in by_name and i not in seen]
        d = 1 + max((depth(i, seen | {name}) for i in ins), default=-1)
        out[name] = d
        return d

    for n in nodes:
        depth(n.node, frozenset())
    return out


def layout(nodes: Sequence[gateway_pb2.NodeTrace], min_width: float = 0.0) -> Layout:
    """Layers by depth; an arrow that skips layers gets a narrow slot in each (a Sugiyama
    dummy), and each layer is ordered by the mean x of what feeds it. The picture is at
    least `min_width` wide (say, for its title), the layers centred in it."""
    by_name = {n.node: n for n in nodes}
    level = depths(nodes)
    count = max(level.values(), default=-1) + 1
    texts = [(text, size, weight) for n in nodes for _, size, weight, text in _lines(n)]
    box_w = max([float(BOX_W), *(_text_width(*t) + 2 * BOX_PAD for t in texts)])
    layers: list[list[str]] = [[] for _ in range(count)]
    width_of: dict[str, float] = {}
    feeds: dict[str, list[str]] = {}
    chains: dict[tuple[str, str], list[str]] = {}
    for n in nodes:  # funnel order within a layer, to start with
        layers[level[n.node]].append(n.node)
        width_of[n.node] = box_w
        feeds.setdefault(n.node, [])
    for n in nodes:
        for src in (i for i in n.inputs if i in by_name):
            chain = [src]
            for d in range(level[src] + 1, level[n.node]):
                slot = f"{src}->{n.node}@{d}"
                layers[d].append(slot)
                width_of[slot] = DUMMY_W
                feeds[slot] = [chain[-1]]
                chain.append(slot)
            feeds[n.node].append(chain[-1])
            chains[(src, n.node)] = [*chain, n.node]
    centre: dict[str, float] = {}
    width = 2 * MARGIN + max(
        [480.0, *(sum(width_of[k] for k in layer) + GAP_X * (len(layer) - 1) for layer in layers)]
    )
    width = max(width, min_width)
    for layer in layers:
        layer.sort(key=lambda k: _mean([centre[f] for f in feeds[k] if f in centre]))
        x = (width - sum(width_of[k] for k in layer) - GAP_X * (len(layer) - 1)) / 2
        for k in layer:
            centre[k] = x + width_of[k] / 2
            x += width_of[k] + GAP_X
    top = {
        k: float(MARGIN + TITLE_H + d * (BOX_H + GAP_Y)) for d, ks in enumerate(layers) for k in ks
    }
    boxes = {name: Box(by_name[name], centre[name] - box_w / 2, top[name]) for name in by_name}
    # Arrows leave and enter a box at ports spread along its edge, ordered by where the other
    # end is, so that several arrows at one box stay apart.
    out_port = _ports({e: centre[c[1]] for e, c in chains.items()}, 0, centre, box_w)
    in_port = _ports({e: centre[c[-2]] for e, c in chains.items()}, 1, centre, box_w)
    routes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for edge, chain in chains.items():
        points = [(out_port[edge], top[chain[0]] + BOX_H)]
        for slot in chain[1:-1]:
            points += [(centre[slot], top[slot]), (centre[slot], top[slot] + BOX_H)]
        routes[edge] = [*points, (in_port[edge], top[chain[-1]])]
    height = MARGIN + TITLE_H + count * (BOX_H + GAP_Y) - GAP_Y + MARGIN
    return Layout(boxes, routes, width, height, box_w)


def _ports(
    other_end: dict[tuple[str, str], float], side: int, centre: dict[str, float], box_w: float
) -> dict[tuple[str, str], float]:
    """x of each edge's port on its box (`side` 0: the source's bottom, 1: the target's top)."""
    at: dict[str, list[tuple[str, str]]] = {}
    for edge in other_end:
        at.setdefault(edge[side], []).append(edge)
    out = {}
    for name, edges in at.items():
        edges.sort(key=lambda e: other_end[e])
        step = min(PORT_GAP, box_w / (len(edges) + 1))
        for i, e in enumerate(edges):
            out[e] = centre[name] + (i - (len(edges) - 1) / 2) * step
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def svg(nodes: Sequence[gateway_pb2.NodeTrace], title: str, subtitle: str = "") -> str:
    """The DAG of `nodes` (a funnel's NodeTraces, with their inputs) as an SVG document."""
    heading = max(_text_width(title, 16, "bold"), _text_width(subtitle, 12, "normal"))
    lay = layout(nodes, min_width=heading + 2 * MARGIN)
    width, height = lay.width, lay.height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{ROOT_CLASS}" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        'font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        '<path d="M 0 0 L 10 5 L 0 10 z" fill="#5f6368"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 16}" font-size="16" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    if subtitle:
        parts.append(
            f'<text x="{MARGIN}" y="{MARGIN + 36}" font-size="12" fill="#5f6368">'
            f"{escape(subtitle)}</text>"
        )
    for (src, dst), points in lay.routes.items():
        parts.append(_edge(lay.boxes[src].node, lay.boxes[dst].node, points))
    for box in lay.boxes.values():
        parts.append(_box(box, lay.box_w))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _edge(
    src: gateway_pb2.NodeTrace, dst: gateway_pb2.NodeTrace, points: list[tuple[float, float]]
) -> str:
    """A smooth curve between layers, straight through each skipped layer's slot."""
    (x, y), rest = points[0], points[1:]
    d = [f"M {x:.1f} {y:.1f}"]
    for i in range(0, len(rest), 2):
        x2, y2 = rest[i]
        bend = (y2 - y) / 2
        d.append(f"C {x:.1f} {y + bend:.1f}, {x2:.1f} {y2 - bend:.1f}, {x2:.1f} {y2:.1f}")
        if i + 1 < len(rest):
            x, y = rest[i + 1]
            d.append(f"L {x:.1f} {y:.1f}")
    (x1, y1), (x2, y2) = points[0], points[1]
    return (
        f'<g class="edge" data-from={quoteattr(src.node)} data-to={quoteattr(dst.node)}>'
        f'<path d="{" ".join(d)}" fill="none" stroke="#5f6368" stroke-width="1.5" '
        'marker-end="url(#arrow)"/>'
        f'<text x="{(x1 + x2) / 2 + 4:.1f}" y="{(y1 + y2) / 2:.1f}" font-size="11" '
        f'fill="#5f6368">{src.items_out}</text></g>'
    )


def _lines(n: gateway_pb2.NodeTrace) -> list[tuple[int, int, str, str]]:
    """(y offset, font size, weight, text) of each line of a node's box."""
    counts = f"{n.items_in} \u2192 {n.items_out} items \u00b7 {n.duration_ms:.1f} ms"
    lines = [(18, 14, "bold", n.node), (36, 11, "normal", n.op), (54, 12, "normal", counts)]
    if n.status != "ok":
        lines.append((70, 10, "normal", n.status + (f": {n.fallback}" if n.fallback else "")))
    return lines


def _box(box: Box, box_w: float) -> str:
    n = box.node
    fill, stroke = COLOURS.get(n.status, _OTHER)
    x, y = box.x, box.y
    tip = f"{n.node} ({n.op}): {n.status}" + (f" \u2014 {n.error}" if n.error else "")
    out = [
        f'<g class="node" data-node={quoteattr(n.node)} data-status={quoteattr(n.status)}>',
        f"<title>{escape(tip)}</title>",
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w:.0f}" height="{BOX_H}" rx="8" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="2"/>',
    ]
    for dy, size, weight, text in _lines(n):
        out.append(
            f'<text x="{x + BOX_PAD:.1f}" y="{y + dy:.1f}" font-size="{size}" '
            f'font-weight="{weight}">{escape(text)}</text>'
        )
    out.append("</g>")
    return "".join(out)


def _text_width(text: str, size: int, weight: str) -> float:
    """A generous estimate of the width of `text` in pixels at font size `size`."""
    return len(text) * CHAR_EM[weight] * size


def is_picture(text: str) -> bool:
    """Whether an SVG document is a DAG picture `edgeflow explain` wrote (also one written
    before the root carried ROOT_CLASS: it has node groups with data-node)."""
    head = text.lstrip()[:4096]
    if not head.startswith("<svg"):
        return False
    return f'class="{ROOT_CLASS}"' in head or '<g class="node" data-node=' in text


def render(resp: gateway_pb2.RecommendResponse, member: int) -> str:
    """The DAG picture of a debug or explain response: title with surface, member, variants
    and total time."""
    variants = ", ".join(f"{a.experiment}={a.variant}" for a in resp.assignments) or "none"
    title = f"{resp.surface} for member {member}  \u00b7  {resp.funnel.total_ms:.1f} ms"
    subtitle = f"workflow {resp.workflow}  \u00b7  variants: {variants}"
    if resp.partial:
        subtitle += "  \u00b7  partial"
    return svg(resp.funnel.nodes, title, subtitle)
