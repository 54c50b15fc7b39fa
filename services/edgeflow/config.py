"""Configuration from the environment: one place that names every variable."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

# The repository root when running from a checkout (editable install or tests).
REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"environment variable {name}={raw!r} is not an integer") from exc


def _env_float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise SystemExit(f"environment variable {name}={raw!r} is not a number >= 0")
    return value


@dataclass(frozen=True)
class Config:
    """Every setting a service or the CLI reads; defaults are the embedded local suite."""

    home: Path = field(default_factory=lambda: Path(_env("EDGEFLOW_HOME", ".edgeflow")).resolve())
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:6390/0"))
    qdrant_url: str = field(default_factory=lambda: _env("QDRANT_URL", ""))
    # API key of the Qdrant server (its service.api_key), sent as the api-key header; empty:
    # none. A secret: never logged (repr=False keeps it out of the dataclass repr too).
    qdrant_api_key: str = field(default_factory=lambda: _env("QDRANT_API_KEY", ""), repr=False)
    # Member embeddings (vectors.py). A server collection's shards and replication factor
    # (with QDRANT_URL), and the HNSW index of both engines: links per point, the candidate
    # list while building and while searching, and scalar quantization ("int8"; "none": off).
    qdrant_shards: int = field(default_factory=lambda: _env_int("QDRANT_SHARDS", 1))
    qdrant_replicas: int = field(default_factory=lambda: _env_int("QDRANT_REPLICAS", 1))
    hnsw_m: int = field(default_factory=lambda: _env_int("QDRANT_HNSW_M", 16))
    hnsw_ef_construct: int = field(default_factory=lambda: _env_int("QDRANT_HNSW_EF_CONSTRUCT", 64))
    hnsw_ef: int = field(default_factory=lambda: _env_int("QDRANT_HNSW_EF", 128))
    qdrant_quantization: str = field(default_factory=lambda: _env("QDRANT_QUANTIZATION", "none"))
    candidates_addr: str = field(default_factory=lambda: _env("CANDIDATES_ADDR", "127.0.0.1:50061"))
    features_addr: str = field(default_factory=lambda: _env("FEATURES_ADDR", "127.0.0.1:50062"))
    scoring_addr: str = field(default_factory=lambda: _env("SCORING_ADDR", "127.0.0.1:50063"))
    merging_addr: str = field(default_factory=lambda: _env("MERGING_ADDR", "127.0.0.1:50064"))
    gateway_addr: str = field(default_factory=lambda: _env("GATEWAY_ADDR", "127.0.0.1:50060"))
    # The nearline worker's health and metrics endpoint (it serves no edgeflow API).
    nearline_addr: str = field(default_factory=lambda: _env("NEARLINE_ADDR", "127.0.0.1:50065"))
    # API keys on the gateway (edgeflow.shell.auth): "on" in `edgeflow up` and the chart.
    auth: bool = field(default_factory=lambda: _env("EDGEFLOW_AUTH", "off") == "on")
    # The keys file; empty: $EDGEFLOW_HOME/auth/keys.json.
    auth_keys: str = field(default_factory=lambda: _env("EDGEFLOW_AUTH_KEYS", ""))
    # TLS between the processes: a directory of ca.crt, tls.crt and tls.key (see tls.py);
    # empty: plaintext, as on loopback.
    tls_dir: Path | None = field(
        default_factory=lambda: Path(d) if (d := _env("EDGEFLOW_TLS_DIR", "")) else None
    )
    # Port a service listens on; set per process by `edgeflow serve` or the chart.
    port: int = field(default_factory=lambda: _env_int("PORT", 0))
    # Interface the gRPC server listens on: loopback unless told otherwise (the image and the
    # chart set 0.0.0.0, a pod's own network), so a service run by hand is not on the LAN.
    bind_host: str = field(default_factory=lambda: _env("BIND_HOST", "127.0.0.1"))
    # Prometheus /metrics port of the process; 0: no endpoint. The chart names it "metrics".
    metrics_port: int = field(default_factory=lambda: _env_int("METRICS_PORT", 0))
    # Interface /metrics listens on: loopback too unless told otherwise (as bind_host).
    metrics_host: str = field(default_factory=lambda: _env("METRICS_HOST", "127.0.0.1"))
    otlp_endpoint: str = field(default_factory=lambda: _env("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    log_level: str = field(default_factory=lambda: _env("LOG_LEVEL", "INFO"))
    # How often services poll Redis for a new graph version or new models (seconds).
    reload_interval_s: float = field(
        default_factory=lambda: float(_env("EDGEFLOW_RELOAD_INTERVAL_S", "2"))
    )
    # Request CPU work (cpu.py): threads of each process's pool; 0 runs it on the event loop.
    cpu_threads: int = field(default_factory=lambda: _env_int("EDGEFLOW_CPU_THREADS", 2))
    # Refuse request work whose deadline has already passed; 0 starts it however late.
    deadline_checks: bool = field(
        default_factory=lambda: _env_int("EDGEFLOW_DEADLINE_CHECKS", 1) != 0
    )
    # Friends of friends: neighbour visits one two-hop expansion may make before the
    # best-connected intermediates are left out (hub members); 0: no cap.
    fof_max_visits: int = field(
        default_factory=lambda: _env_int("EDGEFLOW_FOF_MAX_VISITS", 100_000)
    )
    # Gateway: a request's candidate sources go to the candidates service in one
    # GenerateMany ("all"), one per node timeout ("timeout"), or one until a workflow's
    # slower sources are often slow enough to hold up the faster ones ("auto").
    candidate_batches: str = field(
        default_factory=lambda: _env("EDGEFLOW_CANDIDATE_BATCHES", "auto")
    )
    workflows_dir: Path = field(
        default_factory=lambda: Path(_env("EDGEFLOW_WORKFLOWS", str(REPO_ROOT / "workflows")))
    )
    feature_repo_template: Path = field(
        default_factory=lambda: Path(
            _env("EDGEFLOW_FEATURE_REPO_TEMPLATE", str(REPO_ROOT / "feature_repo"))
        )
    )
    # gRPC calls a service runs at once before it sheds more with RESOURCE_EXHAUSTED;
    # 0: the service's own bound (edgeflow.shell.guard, from its memory and message sizes).
    max_concurrent_rpcs: int = field(
        default_factory=lambda: _env_int("EDGEFLOW_MAX_CONCURRENT_RPCS", 0)
    )
    # Gateway Publish: how far an event's time may be ahead of the gateway's clock, and
    # behind it (seconds); further is INVALID_ARGUMENT.
    event_max_future_s: float = field(
        default_factory=lambda: _env_float("EDGEFLOW_EVENT_MAX_FUTURE_S", 86400.0)
    )
    event_max_age_s: float = field(
        default_factory=lambda: _env_float("EDGEFLOW_EVENT_MAX_AGE_S", 365 * 86400.0)
    )
    # Nearline: event entries pending this long with a consumer are taken over (its worker
    # is presumed dead); a worker renews its lease every third of nearline_lease_s, and one
    # whose lease lapsed has its pending entries taken over at once.
    nearline_claim_idle_s: float = field(
        default_factory=lambda: _env_float("NEARLINE_CLAIM_IDLE_S", 30.0)
    )
    nearline_lease_s: float = field(default_factory=lambda: _env_float("NEARLINE_LEASE_S", 3.0))

    @property
    def model_dir(self) -> Path:
        """The model registry: <model_dir>/<name>/<version>/{model.onnx,card.json}."""
        return Path(_env("EDGEFLOW_MODEL_DIR", str(self.home / "models")))

    @property
    def qdrant_path(self) -> Path:
        """The in-process engine's storage (qdrant-edge shards), used when QDRANT_URL is
        unset: `shards/<collection>` written by training, `readers/<pid>-<collection>` the
        private copy each reading process opens."""
        return Path(_env("QDRANT_PATH", str(self.home / "qdrant")))

    @property
    def feature_repo(self) -> Path:
        """The rendered Feast repo (feature_store.yaml points at this suite's Redis)."""
        return Path(_env("EDGEFLOW_FEATURE_REPO", str(self.home / "feature_repo")))

    @property
    def run_dir(self) -> Path:
        """Pid files and logs of the processes `edgeflow up` started."""
        return self.home / "run"

    @property
    def graph_dir(self) -> Path:
        """This machine's graph snapshot files, each mapped by every process that holds the
        graph (graph_store.py). Local disk; in a pod, its emptyDir."""
        return Path(_env("EDGEFLOW_GRAPH_DIR", str(self.home / "graph")))

    @property
    def keys_path(self) -> Path:
        """The API keys file the gateway checks callers against (edgeflow.shell.auth)."""
        return Path(self.auth_keys) if self.auth_keys else self.home / "auth" / "keys.json"


# Settings of one command rather than of a suite's processes.
API_KEY_ENV = "EDGEFLOW_API_KEY"
FSYNC_ENV = "EDGEFLOW_REDIS_FSYNC"


def api_key() -> str:
    """The API key the CLI sends to the gateway; empty: the local admin key (auth.py)."""
    return _env(API_KEY_ENV, "")


def redis_fsync() -> str:
    """When a local Redis fsyncs its AOF (local/redis_server.py)."""
    return _env(FSYNC_ENV, "always")


def job_completion_index() -> str:
    """The shard of an offline job pod: a Kubernetes Indexed Job sets it; empty: none."""
    return _env("JOB_COMPLETION_INDEX", "")


def load() -> Config:
    """The settings of a CLI command. Without REDIS_URL, a command run beside a local suite
    on a Redis Cluster (`edgeflow up --redis-cluster N`) talks to that cluster."""
    cfg = Config()
    if "REDIS_URL" not in os.environ:
        from edgeflow.local.suite import Suite

        suite = Suite.load(cfg.home)
        if suite is not None and suite.redis_cluster:
            cfg = dataclasses.replace(cfg, redis_url=suite.redis_url)
    return cfg
