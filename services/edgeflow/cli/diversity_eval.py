"""What `edgeflow eval` measures of diversity: how alike the served lists are (intra-list
similarity) and, with --diversity, the same members served by a second arm, pymk with
diversity switched (on with the given params, or off where pymk has it), compared on recall
and intra-list similarity. Both arms run in one suite, on one split."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from edgeflow import config
from edgeflow.build.embeddings import member_embeddings, normalized
from edgeflow.cli import CliError
from edgeflow.features.schema import EMBEDDING_DIM
from edgeflow.graph import Graph
from edgeflow.merging import diversity
from edgeflow.stores import keys
from edgeflow.stores.redis_client import SyncClient
from edgeflow.workflow.ops import DiversityParams

SURFACE = "pymk"
ARM_SURFACE = "pymk-diversity-arm"
FIRST_SCREEN = 10  # also measured over the first positions, which diversity re-ranks

Lists = dict[int, list[int]]


def recall(recs: Lists, truth: dict[int, set[int]]) -> float:
    hits = sum(len(truth[m].intersection(r)) for m, r in recs.items())
    total = sum(len(truth[m]) for m in recs)
    return hits / total if total else 0.0


def intra_list_similarity(
    graph: Graph, recs: Lists, vectors: np.ndarray, top: int
) -> dict[str, float]:
    """How alike each list's first `top` edges are, averaged over the lists of two or more:
    the mean over pairs of the similarity diversity re-ranks by (mutual connections, in the
    training graph) and, as a view it does not optimise, of the embeddings' cosine."""
    members = [m for m, r in recs.items() if len(r[:top]) >= 2]
    if not members:
        return {"mutual_connections": 0.0, "embedding_cosine": 0.0}
    sizes = np.asarray([len(recs[m][:top]) for m in members], dtype=np.float64)
    cands = np.full((len(members), int(sizes.max())), -1, dtype=np.int64)
    for row, m in enumerate(members):
        cands[row, : len(recs[m][:top])] = graph.indices_of(np.asarray(recs[m][:top]))
    mutual = diversity.similarity(graph, graph.indices_of(np.asarray(members)), cands)
    emb = vectors[np.maximum(cands, 0)] * (cands >= 0)[:, :, None]
    cosine = np.einsum("bid,bjd->bij", emb, emb)
    pairs = sizes * (sizes - 1)

    def mean(sim: np.ndarray) -> float:
        off = sim.sum(axis=(1, 2)) - np.trace(sim, axis1=1, axis2=2)
        return round(float(np.mean(off / pairs)), 5)

    return {"mutual_connections": mean(mutual), "embedding_cosine": mean(cosine)}


def quality(
    graph: Graph, recs: Lists, truth: dict[int, set[int]], vectors: np.ndarray, k: int
) -> dict[str, Any]:
    """Recall and intra-list similarity of served lists, at k and over the first screen."""
    first = min(FIRST_SCREEN, k)
    recs = {m: r[:k] for m, r in recs.items()}
    return {
        "recall_at_k": round(recall(recs, truth), 5),
        f"recall_at_{first}": round(recall({m: r[:first] for m, r in recs.items()}, truth), 5),
        "intra_list_similarity_at_k": intra_list_similarity(graph, recs, vectors, k),
        f"intra_list_similarity_at_{first}": intra_list_similarity(graph, recs, vectors, first),
    }


def write_arm(workflows: Path, out: Path, spec: str) -> dict[str, Any]:
    """Copy the workflows to `out` and add pymk as ARM_SURFACE with diversity switched: on
    with `spec` (JSON params; empty: the defaults) where pymk has none, off where it has it.
    Returns the arm's diversity params ({}: off)."""
    shutil.copytree(workflows, out, dirs_exist_ok=True)
    doc = yaml.safe_load((workflows / f"{SURFACE}.yaml").read_text())
    blend = next(n for n in doc["spec"]["nodes"] if n["name"] == doc["spec"]["output"])
    params = blend.setdefault("params", {})
    arm: dict[str, Any] = {}
    if "diversity" in params:
        if spec:
            raise CliError(f"--diversity: {SURFACE} has diversity already, so its arm is "
                           "without it and takes no params")  # fmt: skip
        del params["diversity"]
    else:
        try:
            arm = DiversityParams.model_validate(json.loads(spec or "{}")).model_dump(by_alias=True)
        except (ValueError, ValidationError) as exc:
            raise CliError(f"--diversity: {' '.join(str(exc).split())}") from None
        params["diversity"] = arm
    doc["metadata"]["name"] = doc["spec"]["surface"] = ARM_SURFACE
    doc["spec"]["modes"] = {"online": {"enabled": True}}  # it reads pymk's own list
    (out / f"{ARM_SURFACE}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return arm


@dataclass
class Arm:
    """The --diversity arm of one eval run (`enabled` False without the flag)."""

    enabled: bool
    params: dict[str, Any] = field(default_factory=dict)
    lists: Lists = field(default_factory=dict)
    failed: int = 0
    partial: int = 0

    def serve(
        self,
        client: SyncClient,
        members: list[int],
        settled: Callable[[], None],
        recommend: Callable[[str], tuple[Lists, int, int]],
    ) -> None:
        """Serve the members through the arm: once `settled` (every exposure so far is in),
        from no impressions, as the first session started."""
        if not self.enabled:
            return
        settled()
        client.delete(*(keys.impressions(m) for m in members))
        self.lists, self.failed, self.partial = recommend(ARM_SURFACE)

    def report(
        self,
        graph: Graph,
        recs: Lists,
        truth: dict[int, set[int]],
        k: int,
        seed: int,
    ) -> dict[str, Any]:
        """The served lists' intra-list similarity and, with the arm, the comparison: recall
        lost is the share of the recall without diversity that the diverse lists miss."""
        vectors = normalized(member_embeddings(graph, EMBEDDING_DIM, seed))
        served = quality(graph, recs, truth, vectors, k)
        first = min(FIRST_SCREEN, k)
        out: dict[str, Any] = {
            key: served[key]
            for key in ("intra_list_similarity_at_k", f"intra_list_similarity_at_{first}")
        }
        if not self.enabled:
            return out
        other = quality(graph, self.lists, truth, vectors, k)
        on, off = (other, served) if self.params else (served, other)

        def lost(key: str) -> float | None:
            return round(1 - on[key] / off[key], 5) if off[key] else None

        out["diversity"] = {
            "arm": ARM_SURFACE,
            "arm_params": self.params or "off",
            "with": on,
            "without": off,
            "recall_lost_at_k": lost("recall_at_k"),
            f"recall_lost_at_{first}": lost(f"recall_at_{first}"),
            "arm_failed_requests": self.failed,
            "arm_partial_responses": self.partial,
        }
        return out


@contextlib.contextmanager
def arm_workflows(spec: str | None) -> Iterator[Arm]:
    """With --diversity (`spec` not None): the suite's services read the workflows, plus
    the arm, from a temporary directory (EDGEFLOW_WORKFLOWS) while this lasts."""
    if spec is None:
        yield Arm(False)
        return
    before = os.environ.get("EDGEFLOW_WORKFLOWS")
    with tempfile.TemporaryDirectory(prefix="edgeflow-eval-") as tmp:
        arm = Arm(True, write_arm(config.load().workflows_dir, Path(tmp), spec))
        os.environ["EDGEFLOW_WORKFLOWS"] = tmp
        try:
            yield arm
        finally:
            if before is None:
                os.environ.pop("EDGEFLOW_WORKFLOWS", None)
            else:
                os.environ["EDGEFLOW_WORKFLOWS"] = before
