"""Experiments in the workflow spec: validation, sticky assignment and the exposure log."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import redis
import yaml

from edgeflow.config import REPO_ROOT
from edgeflow.experiments import records
from edgeflow.experiments.stream_log import StreamLog
from edgeflow.local.redis_server import RedisProcess
from edgeflow.stores.resp import RawPipeline
from edgeflow.workflow.assign import BUCKETS, Bucketing, assign, bucket
from edgeflow.workflow.model import Experiment
from edgeflow.workflow.validate import (
    WorkflowError,
    check,
    check_models,
    load_workflow,
    locate_model_problems,
)

EXAMPLE = REPO_ROOT / "examples" / "pymk-ab.yaml"
N_MEMBERS = 100_000


@pytest.fixture
def spec() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc["spec"]


def _experiment(weights: dict[str, float], **extra: Any) -> Experiment:
    variants = [{"name": n, "weight": w} for n, w in weights.items()]
    return Experiment.model_validate({"name": "exp", "variants": variants, **extra})


def _errors(spec: dict[str, Any]) -> str:
    with pytest.raises(WorkflowError) as err:
        check(spec)
    return str(err.value)


# ---- assignment ---------------------------------------------------------------------------
def test_weight_split_over_100k_members() -> None:
    exp = Bucketing.of(_experiment({"a": 50, "b": 30, "c": 20}))
    counts = Counter(exp.variant(m) for m in range(N_MEMBERS))
    for name, weight in (("a", 50), ("b", 30), ("c", 20)):
        # Binomial sd at 100k is at most 0.16 points; 0.8 points is 5 sd.
        assert counts[name] / N_MEMBERS == pytest.approx(weight / 100, abs=0.008)


def test_targeting_share_and_allow_list() -> None:
    exp = Bucketing.of(_experiment({"a": 50, "b": 50}, targeting={"share": 0.2}))
    inside = [m for m in range(N_MEMBERS) if exp.variant(m) is not None]
    assert len(inside) / N_MEMBERS == pytest.approx(0.2, abs=0.008)
    # Targeting is hashed apart from the variant split: the split holds among the targeted.
    split = Counter(exp.variant(m) for m in inside)
    assert split["a"] / len(inside) == pytest.approx(0.5, abs=0.02)

    allow = Bucketing.of(_experiment({"a": 50, "b": 50}, targeting={"allowList": [3, 5, 7]}))
    assert {m for m in range(1000) if allow.variant(m) is not None} == {3, 5, 7}


def test_assignment_is_sticky_and_salted() -> None:
    exp = Bucketing.of(_experiment({"a": 50, "b": 50}))
    first = [exp.variant(m) for m in range(2000)]
    assert first == [exp.variant(m) for m in range(2000)]
    resalted = Bucketing.of(_experiment({"a": 50, "b": 50}, salt="round-2"))
    second = [resalted.variant(m) for m in range(2000)]
    moved = sum(a != b for a, b in zip(first, second, strict=True))
    assert 0.4 < moved / 2000 < 0.6  # a new salt reshuffles about half, independently


def test_assignment_is_the_same_in_another_process() -> None:
    """Another replica (a fresh interpreter, another hash seed) assigns the same variants."""
    code = (
        "from edgeflow.workflow.assign import bucket;"
        "print(','.join(str(bucket('exp', m)) for m in range(500)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    ).stdout.strip()  # fmt: skip
    assert out == ",".join(str(bucket("exp", m)) for m in range(500))
    assert all(0 <= int(b) < BUCKETS for b in out.split(","))


def test_experiments_are_independent(spec: dict[str, Any]) -> None:
    wf = check(spec)
    pairs = Counter(assign(wf.bucketing, m) for m in range(N_MEMBERS))
    in_popular = sum(n for a, n in pairs.items() if len(a) == 2)
    assert in_popular / N_MEMBERS == pytest.approx(0.2, abs=0.008)
    both_treated = pairs[(("ranker-v2", "v2"), ("popular-source", "with-popular"))]
    assert both_treated / N_MEMBERS == pytest.approx(0.5 * 0.2 * 0.5, abs=0.006)


# ---- the compiled variants ----------------------------------------------------------------
def test_variants_compile_with_their_overrides(spec: dict[str, Any]) -> None:
    wf = load_workflow(EXAMPLE)
    assert len(wf.variants) == 2 * 3  # ranker-v2 variants x (outside, control, with-popular)
    v2 = wf.variants[(("ranker-v2", "v2"),)]
    assert v2.node("rank").params.version == "v2"  # type: ignore[attr-defined]
    assert wf.node("rank").params.version == "v1"  # type: ignore[attr-defined]
    popular = wf.variants[(("ranker-v2", "v1"), ("popular-source", "with-popular"))]
    assert popular.node("features").node.inputs == ["fof", "ebr", "popular"]
    assert [n.node.name for n in popular.nodes][:3] == ["fof", "ebr", "popular"]
    ((shadow, graph),) = wf.shadows
    assert shadow.name == "ebr-wide" and graph.node("ebr").params.limit == 400  # type: ignore[attr-defined]
    member = next(m for m in range(1000) if wf.for_member(m)[1] == (("ranker-v2", "v2"),))
    assert wf.for_member(member)[0] is v2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["experiments"][0]["variants"][1].update(weight=40),
            "experiment 'ranker-v2': variants: weights must sum to 100, got 90",
        ),
        (
            lambda s: s["experiments"][0]["variants"][1]["overrides"].update(models={"nope": "v2"}),
            "experiment 'ranker-v2' variant 'v2' field overrides.models.nope: no node 'nope'",
        ),
        (
            lambda s: s["experiments"][0]["variants"][1]["overrides"].update(models={"fof": "v2"}),
            "overrides.models.fof: node 'fof' is candidates.graph, not a scoring node",
        ),
        (
            lambda s: s["experiments"][0]["variants"][1]["overrides"].update(
                params={"ghost": {"limit": 3}}
            ),
            "experiment 'ranker-v2' variant 'v2' field overrides.params.ghost: no node 'ghost'",
        ),
        (
            lambda s: s["experiments"][0]["variants"][1]["overrides"].update(
                params={"fof": {"limit": -3}}
            ),
            "experiment 'ranker-v2' variant 'v2': node 'fof' field params.limit",
        ),
        (
            lambda s: s["experiments"][0]["variants"][1]["overrides"].update(
                models={"rank": "2.0"}
            ),
            "experiment 'ranker-v2' variant 'v2': node 'rank' field params.version",
        ),
        (
            lambda s: s["experiments"][1]["variants"][1]["overrides"]["nodes"][1].update(
                inputs=["fof", "missing"]
            ),
            "variant 'with-popular': node 'features' field inputs: unknown node 'missing'",
        ),
        (
            lambda s: s["experiments"][0].update(control="nope"),
            "experiment 'ranker-v2': control: 'nope' is not a variant; variants: ['v1', 'v2']",
        ),
        (
            lambda s: s["experiments"][0]["variants"].append({"name": "v1", "weight": 0}),
            "duplicate variant names ['v1']",
        ),
        (
            lambda s: s["experiments"][1]["variants"][1]["overrides"].update(models={"rank": "v3"}),
            "experiment 'ranker-v2' also overrides node 'rank'",
        ),
        (
            lambda s: s["experiments"].append(copy.deepcopy(s["experiments"][0]) | {"salt": "x"}),
            "experiment 'ranker-v2': duplicate experiment name",
        ),
        (
            lambda s: s["shadows"][0].update(share=0),
            "shadow 'ebr-wide' field share: Input should be greater than 0",
        ),
        (
            lambda s: s["shadows"][0]["overrides"].update(output="ghost"),
            "shadow 'ebr-wide' field overrides.output: no node 'ghost'",
        ),
        (
            lambda s: s["experiments"][0].update(targeting={"share": 1.5}),
            "experiment 'ranker-v2' field targeting.share",
        ),
    ],
)
def test_invalid_experiments_name_what_and_where(
    spec: dict[str, Any], edit: Any, message: str
) -> None:
    edit(spec)
    assert message in _errors(spec)


def test_variant_model_versions_are_checked_against_the_registry(spec: dict[str, Any]) -> None:
    wf = check(spec)
    problems = check_models(wf, {"pymk-ranker": ["v1"]})
    assert problems == [
        "experiment 'ranker-v2' variant 'v2': node 'rank' field params.version: model "
        "'pymk-ranker' has no version 'v2' (it has ['v1'])"
    ]
    assert check_models(wf, {"pymk-ranker": ["v1", "v2"]}) == []


def test_model_problems_are_blamed_on_the_variant_or_shadow_that_has_them(
    spec: dict[str, Any],
) -> None:
    spec["shadows"][0]["overrides"]["models"] = {"rank": "v3"}
    wf = check(spec)
    found = locate_model_problems(wf, {"pymk-ranker": ["v1"]})
    missing = "node 'rank' field params.version: model 'pymk-ranker' has no version"
    # Only ranker-v2's v2 overrides rank: the popular-source variants it is combined with
    # are not to blame.
    assert found.workflow == ()
    assert found.variants == {("ranker-v2", "v2"): (f"{missing} 'v2' (it has ['v1'])",)}
    assert found.shadows == {"ebr-wide": (f"{missing} 'v3' (it has ['v1'])",)}
    assert found.messages() == [
        f"experiment 'ranker-v2' variant 'v2': {missing} 'v2' (it has ['v1'])",
        f"shadow 'ebr-wide': {missing} 'v3' (it has ['v1'])",
    ]
    assert locate_model_problems(wf, {"pymk-ranker": ["v1", "v2", "v3"]}).messages() == []
    unknown = locate_model_problems(wf, {"other": ["v1"]})
    no_model = "node 'rank' field params.model: no model 'pymk-ranker' in the registry"
    assert unknown.workflow == (f"{no_model} (it has ['other'])",)


def test_a_broken_variant_is_served_its_control(spec: dict[str, Any]) -> None:
    from edgeflow.gateway.models import check_surface

    wf = check(spec)
    result = check_surface(wf, {"pymk-ranker": ["v1"]})
    assert result.reroutes == {("ranker-v2", "v2"): "v1"}
    assert len(result.problems) == 1
    members = range(400)
    moved = 0
    for member in members:
        _, assigned = wf.for_member(member)
        route = result.routes.get(assigned)
        if dict(assigned)["ranker-v2"] != "v2":
            assert route is None  # everyone else is served as assigned
            continue
        assert route is not None
        served_graph, served, moves = route
        assert dict(served) == {**dict(assigned), "ranker-v2": "v1"}  # other experiments kept
        assert served_graph is wf.variants[served]
        assert served_graph.node("rank").params.model_dump()["version"] == "v1"
        assert moves == (("ranker-v2", "v2", "v1"),)
        moved += 1
    assert 0.4 < moved / len(members) < 0.6
    # Published later: nothing is rerouted any more.
    healed = check_surface(wf, {"pymk-ranker": ["v1", "v2"]})
    assert healed.problems == () and healed.reroutes == {} and healed.routes == {}


def test_a_variant_is_not_rerouted_where_that_would_not_help(spec: dict[str, Any]) -> None:
    from edgeflow.gateway.models import check_surface

    # The workflow's own graph lacks its model too: nothing better to serve; only reported.
    wf = check(spec)
    result = check_surface(wf, {"other": ["v1"]})
    assert len(result.problems) == 2 and result.reroutes == {} and result.routes == {}
    # A broken control: members of a targeted experiment get the workflow's own graph.
    spec["experiments"][0]["targeting"] = {"share": 0.5}
    spec["experiments"][0]["variants"][0]["overrides"] = {"models": {"rank": "v7"}}
    wf = check(spec)
    result = check_surface(wf, {"pymk-ranker": ["v1"]})
    assert result.reroutes == {("ranker-v2", "v1"): "", ("ranker-v2", "v2"): ""}
    graph, served, moves = result.routes[(("ranker-v2", "v2"),)]
    assert graph is wf and served == () and moves == (("ranker-v2", "v2", ""),)


def test_cli_validate_summarises_experiments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "validate", str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "experiment ranker-v2: all members; v1 50%, v2 50%; control v1" in out
    assert "experiment popular-source: 20% of members" in out
    assert "shadow ebr-wide: 5% of requests, not served" in out


# ---- the exposure log ---------------------------------------------------------------------
def _exposure(i: int) -> dict[str, str]:
    return records.Exposure(
        request_id=f"r{i}", time=1000.0 + i, member=i, surface="pymk", workflow="pymk",
        assignments=(("ranker-v2", "v2"),), items=(5, 6, 7),
    ).encode()  # fmt: skip


async def test_stream_log_writes_batches(
    redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    pipe = RawPipeline(redis_proc.url)
    log = StreamLog(pipe, records.EXPOSURES, records.STREAM_MAXLEN)
    log.start()
    for i in range(1200):
        log.put(_exposure(i))
    await log.close()
    await pipe.close()
    assert log.written == 1200 and log.dropped == 0
    entries = redis_client.xrange(records.EXPOSURES)
    assert len(entries) == 1200
    first = records.Exposure.decode(entries[0][1])
    assert first.request_id == "r0" and first.items == (5, 6, 7)
    assert first.variant("ranker-v2") == "v2"


async def test_stream_log_drops_and_counts_when_redis_is_away() -> None:
    pipe = RawPipeline("redis://127.0.0.1:1/0")  # nothing listens on port 1
    dropped: Counter[str] = Counter()
    log = StreamLog(
        pipe, records.EXPOSURES, 100, on_dropped=lambda r, n: dropped.update({r: n}), max_queue=50
    )
    log.start()
    for i in range(80):  # never blocks: the queue takes 50, the rest is dropped at once
        log.put(_exposure(i))
    assert dropped["queue_full"] == 30
    await asyncio.sleep(0.2)
    await log.close(timeout_s=0.5)
    await pipe.close()
    assert dropped["redis_unavailable"] >= 1
    assert log.written == 0 and log.dropped == sum(dropped.values())


async def test_stream_log_drops_a_batch_redis_refuses(
    redis_proc: RedisProcess, redis_client: redis.Redis
) -> None:
    redis_client.set("ef:not-a-stream", "x")  # XADD answers WRONGTYPE
    pipe = RawPipeline(redis_proc.url)
    dropped: Counter[str] = Counter()
    log = StreamLog(pipe, "ef:not-a-stream", 100, on_dropped=lambda r, n: dropped.update({r: n}))
    log.start()
    log.put(_exposure(0))
    await log.close(timeout_s=2.0)
    await pipe.close()
    assert dropped == {"redis_unavailable": 1} and log.written == 0


def test_the_crd_schema_checks_experiments_at_apply_time() -> None:
    """kubectl apply refuses what the schema can catch, before the operator sees it."""
    from crd_schema import CrdValidator

    crd_file = REPO_ROOT / "charts" / "edgeflow" / "crds" / "edgeworkflows.edgeflow.dev.yaml"
    validator = CrdValidator(yaml.safe_load(crd_file.read_text()))
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    assert validator.errors(doc) == []
    bad = copy.deepcopy(doc)
    bad["spec"]["experiments"][0]["variants"][0]["weight"] = 150
    bad["spec"]["shadows"][0]["share"] = 0
    bad["spec"]["experiments"][1]["targeting"]["tipo"] = 1
    errors = "\n".join(validator.errors(bad))
    assert "spec.experiments.0.variants.0.weight" in errors
    assert "spec.shadows.0.share" in errors
    assert "tipo" in errors


def test_operator_configmap_keeps_experiments_and_shadows() -> None:
    """The gateway in a cluster reads the operator's compiled workflow: nothing is lost."""
    from edgeflow_operator.children import Owner, compiled_yaml

    from edgeflow.workflow.validate import parse_document

    wf = load_workflow(EXAMPLE)
    text = compiled_yaml(wf, Owner("pymk", "default", "uid", {}))
    again = parse_document(yaml.safe_load(text), "configmap")
    assert again.spec.experiments == wf.spec.experiments
    assert again.spec.shadows == wf.spec.shadows
    assert set(again.variants) == set(wf.variants)
