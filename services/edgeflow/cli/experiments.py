"""`edgeflow experiments report|shadow`: A/B results and shadow comparisons from Redis Streams.

Only argparse is imported at module level: `edgeflow` builds every parser at start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeflow.cli import CliError

if TYPE_CHECKING:
    from rich.console import Console

    from edgeflow.experiments.report import Report
    from edgeflow.experiments.shadow_report import ShadowSummary

DEFINITIONS = """\
Definitions:
  exposure    one served edge (request, member, target, position) from ef:exposures.
  outcome     a member event from ef:events: connect and follow are acceptances, dismiss is
              a negative outcome reported separately. An outcome (member, target, type,
              time) joins the LATEST exposure of that member at or before the event time,
              within --window, whose items include the target, and is attributed to that
              exposure's variants. The same (member, target, type) counts once. Outcomes
              that join no exposure are counted as unattributed.
  acceptance  accepted outcomes / exposures; dismiss rate = dismiss outcomes / exposures.
  lift        acceptance rate relative to control's (0.2 = +20%), with a 95% interval by the
              delta method: the member is the unit of randomisation, so each rate's variance
              comes from member-level sums (Deng et al., "Applying the Delta Method in Metric
              Analytics"), and the lift's from the delta method on the ratio of the two
              rates. Significant: the interval excludes 0.
Times (--since/--until) are unix seconds or a duration ago (30m, 24h, 7d); they bound the
stream entries read, of exposures and outcomes alike.
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """30m, 24h, 7d, or plain seconds."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration like 30m, 24h, 7d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def when(text: str) -> float:
    """Unix seconds, or a duration ago (24h)."""
    if _DURATION.match(text) and text.strip()[-1:].isalpha():
        return time.time() - duration(text)
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither unix seconds nor a duration ago like 24h"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: unix seconds must be >= 0")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser(
        "report",
        help="per variant: exposures, acceptance rate and lift over control with a 95%% CI",
        description="Join exposures to outcomes and compare each variant with control.",
        epilog=DEFINITIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("experiment", help="experiment name, as in the workflow spec")
    r.add_argument(
        "--window",
        type=duration,
        default=7 * 86400.0,
        help="how long after an exposure an outcome still counts (default 7d)",
    )
    r.add_argument(
        "--control",
        help="control variant (default: the spec's control for the experiment, else "
        "'control', else the first variant by name, with a warning)",
    )
    r.add_argument(
        "--workflows",
        type=Path,
        help="workflow directory to find the control in (default: EDGEFLOW_WORKFLOWS)",
    )
    _common(r)
    r.set_defaults(func=run)

    s = sub.add_parser(
        "shadow",
        help="per shadow: overlap@k, rank correlation, latency against the served ranking",
    )
    s.add_argument("--surface", help="only this surface's shadows")
    _common(s)
    s.set_defaults(func=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=when, help="first entries read: unix s or ago, e.g. 24h")
    p.add_argument("--until", type=when, help="last entries read: unix s or ago (default now)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--redis-url", help="Redis to read (default: REDIS_URL)")


def run(args: argparse.Namespace) -> int:
    import redis

    from edgeflow import config
    from edgeflow.experiments.report import ReportError
    from edgeflow.stores.redis_client import connect

    cfg = config.load()
    url = args.redis_url or cfg.redis_url
    client = connect(url)
    try:
        if args.action == "report":
            _report(args, client, args.workflows or cfg.workflows_dir)
        else:
            _shadow(args, client)
    except ReportError as exc:
        raise CliError(str(exc)) from None
    except redis.exceptions.ConnectionError as exc:
        raise CliError(f"cannot reach Redis at {url}: {exc}") from None
    finally:
        client.close()
    return 0


def _report(args: argparse.Namespace, client: Any, workflows: Path) -> None:
    from edgeflow.experiments.report import report, spec_control

    default = spec_control(workflows, args.experiment) or "control"
    rep = report(client, args.experiment, args.window, args.control, default,
                 args.since, args.until)  # fmt: skip
    for w in rep.warnings:
        print(f"edgeflow experiments: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        from rich.console import Console

        render_report(rep, Console())


def _shadow(args: argparse.Namespace, client: Any) -> None:
    from edgeflow.experiments.shadow_report import summarize

    summary = summarize(client, args.surface, args.since, args.until)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        from rich.console import Console

        render_shadow(summary, Console())


def _ts(t: float | None, default: str) -> str:
    return default if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.1%}" if signed else f"{x:.2%}"


def _columns(heads: list[str], rows: dict[str, list[str]], console: Console) -> None:
    """One row per metric and one column per variant or shadow: a few columns fit any
    terminal, where a column per metric would not."""
    from rich.table import Table

    table = Table()
    table.add_column("", no_wrap=True)
    for head in heads:
        table.add_column(head, justify="right")
    for metric, cells in rows.items():
        table.add_row(metric, *cells)
    console.print(table)


def render_report(rep: Report, console: Console) -> None:
    console.print(
        f"[bold]experiment {rep.experiment}[/]  window {_span(rep.window_s)}  "
        f"{_ts(rep.since, 'start')} .. {_ts(rep.until, 'now')}  control {rep.control}"
    )
    console.print(
        f"unattributed outcomes {rep.unattributed_outcomes}  "
        f"malformed entries {rep.malformed_entries}"
    )
    vs = rep.variants
    ci = [
        "-" if v.is_control or v.lift_ci_low is None or v.lift_ci_high is None
        else f"[{_pct(v.lift_ci_low, True)}, {_pct(v.lift_ci_high, True)}]"
        for v in vs
    ]  # fmt: skip
    rows = {
        "members": [str(v.members) for v in vs],
        "requests": [str(v.requests) for v in vs],
        "exposures (edges)": [str(v.exposures) for v in vs],
        "accepted": [str(v.accepted) for v in vs],
        "acceptance rate": [_pct(v.acceptance_rate) for v in vs],
        "dismissed": [str(v.dismissed) for v in vs],
        "dismiss rate": [_pct(v.dismiss_rate) for v in vs],
        "lift": ["-" if v.is_control else _pct(v.lift, True) for v in vs],
        "95% CI": ci,
        "significant": [
            "control" if v.is_control else ("[green]yes[/]" if v.significant else "no") for v in vs
        ],
    }
    _columns([v.variant for v in vs], rows, console)


def _ms(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "-"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_shadow(summary: ShadowSummary, console: Console) -> None:
    console.print(f"[bold]shadow comparisons[/]  malformed entries {summary.malformed_entries}")
    if not summary.shadows:
        console.print("no shadow comparisons recorded")
        return
    ss = summary.shadows
    rows = {
        "requests": [str(s.requests) for s in ss],
        "mean overlap@k": [_num(s.mean_overlap_at_k) for s in ss],
        "mean rank correlation": [_num(s.mean_rank_correlation) for s in ss],
        "served ms p50 / p99": [f"{_ms(s.served_p50_ms)} / {_ms(s.served_p99_ms)}" for s in ss],
        "shadow ms p50 / p99": [f"{_ms(s.shadow_p50_ms)} / {_ms(s.shadow_p99_ms)}" for s in ss],
        "shadow partial": [f"{s.partial_share:.1%}" for s in ss],
    }
    _columns([f"{s.surface}/{s.shadow}" for s in ss], rows, console)
