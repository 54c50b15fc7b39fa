"""Publishing member features into Feast: render the repo, write the parquet, apply the
repo's definitions and materialise with Feast's SDK (in process: importing feast takes
seconds, once, where each CLI command would pay it again).

The template in `feature_repo/` is rendered per suite into `cfg.feature_repo`, because each
suite has its own Redis; the registry and the parquet live inside the rendered repo.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeflow.config import Config
from edgeflow.features.schema import EMBEDDING_DIM, EMBEDDING_FEATURE, JOIN_KEY, SCALAR_FEATURES
from edgeflow.graph import Graph
from edgeflow.stores.redis_client import is_cluster, parse_url

if TYPE_CHECKING:
    from feast import FeatureStore

    from edgeflow.offline.progress import Stages

PARQUET = Path("data") / "member_features.parquet"
_REDIS_TOKEN = "${EDGEFLOW_FEAST_REDIS}"
_DEFINITIONS = "definitions.py"  # the repo's one file of Feast objects
_TEMPLATE_FILES = ("feature_store.yaml", _DEFINITIONS, ".feastignore", "README.md")
# Feast's Redis client gets short timeouts too, so a push to a dead Redis fails fast.
_FEAST_REDIS_TIMEOUTS = "socket_connect_timeout=0.5,socket_timeout=5"


class FeastError(RuntimeError):
    """A Feast step failed; the message names the step, the repo and Feast's error."""


def feast_connection_string(redis_url: str) -> str:
    """Feast's `host:port[,host:port],db=N,...` form of a REDIS_URL (password, TLS carried
    over; every node of a cluster URL)."""
    try:
        addr = parse_url(redis_url)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (Feast's online store needs a redis:// or rediss:// URL)"
        ) from None
    parts = [f"{host}:{port}" for host, port in addr.nodes]
    if not addr.cluster:
        parts.append(f"db={addr.db}")
    if addr.username:
        parts.append(f"username={addr.username}")
    if addr.password:
        parts.append(f"password={addr.password}")
    if addr.tls:
        parts.append("ssl=true")
        tls_files = {"ssl_ca_certs": addr.ca_certs, "ssl_certfile": addr.certfile,
                     "ssl_keyfile": addr.keyfile}  # fmt: skip
        parts += [f"{k}={v}" for k, v in tls_files.items() if v]
    parts.append(_FEAST_REDIS_TIMEOUTS)
    return ",".join(parts)


def render_repo(cfg: Config) -> Path:
    """Copy the template into cfg.feature_repo with this suite's Redis filled in."""
    template, repo = cfg.feature_repo_template, cfg.feature_repo
    if not (template / "feature_store.yaml").is_file():
        raise FileNotFoundError(
            f"Feast repo template not found: {template / 'feature_store.yaml'} "
            "(set EDGEFLOW_FEATURE_REPO_TEMPLATE)"
        )
    (repo / "data").mkdir(parents=True, exist_ok=True)
    for name in _TEMPLATE_FILES:
        src = template / name
        if src.is_file():
            shutil.copyfile(src, repo / name)
    yaml_path = repo / "feature_store.yaml"
    text = yaml_path.read_text()
    if _REDIS_TOKEN not in text:
        raise ValueError(f"{template / 'feature_store.yaml'} lacks the {_REDIS_TOKEN} placeholder")
    text = text.replace(_REDIS_TOKEN, feast_connection_string(cfg.redis_url))
    if is_cluster(cfg.redis_url):  # Feast's cluster client, on the line after the string
        text = re.sub(
            r"^(\s*)(connection_string:.*)$", r"\1\2\n\1redis_type: redis_cluster", text, count=1,
            flags=re.MULTILINE,
        )  # fmt: skip
    yaml_path.write_text(text)
    return repo


def write_parquet(
    path: Path,
    member_ids: np.ndarray,
    scalars: np.ndarray,
    embeddings: np.ndarray,
    event_time: datetime,
) -> None:
    """One row per member: member_id, the scalar features, embedding, timestamps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = member_ids.size
    if scalars.shape != (n, len(SCALAR_FEATURES)):
        raise ValueError(
            f"scalars have shape {scalars.shape}, expected ({n}, {len(SCALAR_FEATURES)})"
        )
    if embeddings.shape != (n, EMBEDDING_DIM):
        raise ValueError(
            f"embeddings have shape {embeddings.shape}, expected ({n}, {EMBEDDING_DIM})"
        )
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel(), pa.float32())
    offsets = pa.array(np.arange(0, n * EMBEDDING_DIM + 1, EMBEDDING_DIM, dtype=np.int32))
    columns: dict[str, pa.Array] = {JOIN_KEY: pa.array(member_ids.astype(np.int64))}
    for j, name in enumerate(SCALAR_FEATURES):
        columns[name] = pa.array(scalars[:, j].astype(np.float32), pa.float32())
    columns[EMBEDDING_FEATURE] = pa.ListArray.from_arrays(offsets, flat)
    stamp = pa.array(np.full(n, np.datetime64(event_time.replace(tzinfo=None), "us")))
    columns["event_timestamp"] = stamp.cast(pa.timestamp("us", tz="UTC"))
    columns["created"] = columns["event_timestamp"]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def repo_objects(repo: Path) -> list[Any]:
    """The Feast objects `definitions.py` defines, as `feast apply` would collect them.

    The file is loaded under a name of its own per repo, so two repos in one process never
    share a cached module."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    path = repo / _DEFINITIONS
    name = "edgeflow_feast_repo_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FeastError(f"Feast apply: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise FeastError(f"Feast apply: {path} failed: {type(exc).__name__}: {exc}") from exc
    kinds = (Entity, FeatureView, FeatureService, DataSource)
    found: list[Any] = []
    for value in vars(module).values():
        if isinstance(value, kinds) and not any(value is f for f in found):
            found.append(value)
    if not found:
        raise FeastError(f"Feast apply: {path} defines no Feast objects")
    return found


def _feast_step(step: str, repo: Path, run: Any) -> None:
    """Run one Feast call with its prints and progress bars kept off our output (they are
    shown only if it fails)."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            run()
    except FeastError:
        raise
    except Exception as exc:
        text = f"{said.getvalue().strip()[-1000:]}\n{type(exc).__name__}: {exc}".strip()
        raise FeastError(f"Feast {step} in {repo} failed: {text[-2000:]}") from exc


def publish_member_features(
    cfg: Config,
    graph: Graph,
    scalars: np.ndarray,
    embeddings: np.ndarray,
    stages: Stages | None = None,
) -> Path:
    """Render the repo, write every member's features, apply the definitions, materialise.

    `scalars` is (graph.n, len(SCALAR_FEATURES)) and `embeddings` (graph.n, EMBEDDING_DIM),
    rows in graph.ids order. Returns the rendered repo path.
    """
    from edgeflow.offline.progress import Stages

    stages = stages if stages is not None else Stages(enabled=False)
    with stages.stage("Feast: member features to parquet") as st:
        repo = render_repo(cfg)
        now = datetime.now(UTC).replace(microsecond=0)
        write_parquet(repo / PARQUET, graph.ids, scalars, embeddings, now)
        st.note = f"{graph.n:,} rows in {repo / PARQUET}"
    with stages.stage("Feast apply (registers the feature views)") as st:
        store = feature_store(cfg)
        _feast_step("apply", repo, lambda: store.apply(repo_objects(repo)))
        st.note = str(repo)
    # An explicit window around this publish: every row of the new parquet, and nothing
    # depends on the previous materialisation's bookmark.
    start, end = now - timedelta(days=1), now + timedelta(minutes=1)
    with stages.stage("Feast materialize into the Redis online store") as st:
        _feast_step("materialize", repo, lambda: store.materialize(start, end))
        st.note = f"{graph.n:,} members"
    return repo


def feature_store(cfg: Config) -> FeatureStore:
    """Feast's SDK over the rendered repo (imports feast, which takes seconds)."""
    return feature_store_at(cfg.feature_repo)


def feature_store_at(repo: Path) -> FeatureStore:
    if not (repo / "feature_store.yaml").is_file():
        raise FileNotFoundError(
            f"no Feast repo at {repo}: run `edgeflow train` to publish features"
        )
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo))
