"""Configuration from the environment: one place that names every variable."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Config:
    """Every setting a service or the CLI reads; defaults are the embedded local suite."""

    home: Path = field(default_factory=lambda: Path(_env("EDGEFLOW_HOME", ".edgeflow")).resolve())
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:6390/0"))
    qdrant_url: str = field(default_factory=lambda: _env("QDRANT_URL", ""))
    candidates_addr: str = field(default_factory=lambda: _env("CANDIDATES_ADDR", "127.0.0.1:50061"))
    features_addr: str = field(default_factory=lambda: _env("FEATURES_ADDR", "127.0.0.1:50062"))
    scoring_addr: str = field(default_factory=lambda: _env("SCORING_ADDR", "127.0.0.1:50063"))
    merging_addr: str = field(default_factory=lambda: _env("MERGING_ADDR", "127.0.0.1:50064"))
    gateway_addr: str = field(default_factory=lambda: _env("GATEWAY_ADDR", "127.0.0.1:50060"))
    # Port a service listens on; set per process by `edgeflow serve` or the chart.
    port: int = field(default_factory=lambda: _env_int("PORT", 0))
    # Prometheus /metrics port of the process; 0: no endpoint. The chart names it "metrics".
    metrics_port: int = field(default_factory=lambda: _env_int("METRICS_PORT", 0))
    # Interface it listens on: all of them in a pod; the local suite keeps it on loopback.
    metrics_host: str = field(default_factory=lambda: _env("METRICS_HOST", "0.0.0.0"))
    otlp_endpoint: str = field(default_factory=lambda: _env("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    log_level: str = field(default_factory=lambda: _env("LOG_LEVEL", "INFO"))
    # How often services poll Redis for a new graph version or new models (seconds).
    reload_interval_s: float = field(
        default_factory=lambda: float(_env("EDGEFLOW_RELOAD_INTERVAL_S", "2"))
    )
    workflows_dir: Path = field(
        default_factory=lambda: Path(_env("EDGEFLOW_WORKFLOWS", str(REPO_ROOT / "workflows")))
    )
    feature_repo_template: Path = field(
        default_factory=lambda: Path(
            _env("EDGEFLOW_FEATURE_REPO_TEMPLATE", str(REPO_ROOT / "feature_repo"))
        )
    )

    @property
    def model_dir(self) -> Path:
        """The model registry: <model_dir>/<name>/<version>/{model.onnx,card.json}."""
        return Path(_env("EDGEFLOW_MODEL_DIR", str(self.home / "models")))

    @property
    def qdrant_path(self) -> Path:
        """Qdrant local-mode storage, used when QDRANT_URL is unset."""
        return Path(_env("QDRANT_PATH", str(self.home / "qdrant")))

    @property
    def feature_repo(self) -> Path:
        """The rendered Feast repo (feature_store.yaml points at this suite's Redis)."""
        return Path(_env("EDGEFLOW_FEATURE_REPO", str(self.home / "feature_repo")))

    @property
    def run_dir(self) -> Path:
        """Pid files and logs of the processes `edgeflow up` started."""
        return self.home / "run"


def load() -> Config:
    return Config()
