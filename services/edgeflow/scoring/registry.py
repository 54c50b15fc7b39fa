"""The model registry: <model_dir>/<name>/<version>/{model.onnx,card.json}.

`publish_model` validates a model against its card and renames a finished temp directory into
place, so a reader never sees half a model. `ModelRegistry` keeps warmed-up onnxruntime
sessions in memory and re-scans on `refresh()`: new or changed versions load, and a file that
is corrupt or does not match its card is refused while whatever was serving keeps serving.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeflow.scoring.rollout import (
    ALIASES_FILE,
    CANARY,
    STABLE,
    Aliases,
    RolloutError,
    read_aliases,
    traffic,
)

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("edgeflow.scoring")

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
LATEST = "latest"
REQUIRED_CARD_KEYS = ("features", "input", "output", "output_index")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
_WARMUP_ROWS = (1, 64)
_COLUMN_CACHE_MAX = 64

# (inode, size, mtime_ns) of model.onnx then card.json: a change means "re-verify".
Signature = tuple[int, ...]


class RegistryError(ValueError):
    """A model or card that cannot be served; the message names the path and the problem."""


class ModelNotFoundError(LookupError):
    """The requested model name or version is not loaded."""


def version_number(version: str) -> int | None:
    """3 for "v3"; None for anything that is not a version directory name."""
    match = _VERSION_RE.match(version)
    return int(match.group(1)) if match else None


def _version_dirs(name_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in name_dir.iterdir():
        number = version_number(entry.name)
        if number is not None and entry.is_dir():
            found.append((number, entry))
    return sorted(found)


def _scan(root: Path) -> Iterator[tuple[str, Path]]:
    """(name, version dir) for every published version; temp dirs start with a dot."""
    if not root.is_dir():
        return
    for name_dir in sorted(root.iterdir()):
        if name_dir.name.startswith(".") or not name_dir.is_dir():
            continue
        for _, vdir in _version_dirs(name_dir):
            yield name_dir.name, vdir


def published_versions(model_dir: Path) -> dict[str, list[str]]:
    """Versions on disk per model, oldest first, without loading anything (for validation)."""
    out: dict[str, list[str]] = {}
    for name, vdir in _scan(model_dir):
        out.setdefault(name, []).append(vdir.name)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_card(card: Any, where: str) -> None:
    if not isinstance(card, dict):
        raise RegistryError(f"{where}: the card must be a JSON object, not {type(card).__name__}")
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise RegistryError(f"{where}: the card is missing {', '.join(missing)}")
    features = card["features"]
    if not (
        isinstance(features, list) and features and all(isinstance(f, str) and f for f in features)
    ):
        raise RegistryError(f"{where}: card 'features' must be a non-empty list of column names")
    if len(set(features)) != len(features):
        dups = sorted({f for f in features if features.count(f) > 1})
        raise RegistryError(f"{where}: card 'features' repeats {dups}")
    for key in ("input", "output"):
        if not isinstance(card[key], str) or not card[key]:
            raise RegistryError(f"{where}: card {key!r} must be a tensor name")
    index = card["output_index"]
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise RegistryError(f"{where}: card 'output_index' must be an integer >= 0, not {index!r}")


def _session(data: bytes, where: str) -> ort.InferenceSession:
    import onnxruntime as ort  # imported here: published_versions() stays light

    opts = ort.SessionOptions()
    # Latency on a small box: one thread per request, no inter-op pool.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RegistryError(f"{where}: onnxruntime cannot load it: {_first_line(exc)}") from exc


@dataclass(frozen=True)
class _Binding:
    input: str
    output: str
    output_index: int
    width: int


def _bind(session: ort.InferenceSession, card: dict[str, Any], where: str) -> _Binding:
    """Check the card against the model, then warm it up; returns how to call it."""
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if card["input"] not in names:
        raise RegistryError(f"{where}: card input {card['input']!r} is not a model input {names}")
    if len(inputs) != 1:
        raise RegistryError(f"{where}: the model has inputs {names}; only one input is supported")
    width = len(card["features"])
    shape, kind = inputs[0].shape, inputs[0].type
    if kind != "tensor(float)":
        raise RegistryError(f"{where}: input {names[0]!r} is {kind}; float32 is required")
    if len(shape) != 2:
        raise RegistryError(f"{where}: input {names[0]!r} has shape {shape}, not [rows, {width}]")
    if isinstance(shape[1], int) and shape[1] != width:
        raise RegistryError(
            f"{where}: the card lists {width} features but model input {names[0]!r} "
            f"is {shape[1]} wide"
        )
    outputs = [o.name for o in session.get_outputs()]
    if card["output"] not in outputs:
        raise RegistryError(
            f"{where}: card output {card['output']!r} is not a model output {outputs}"
        )
    binding = _Binding(names[0], card["output"], card["output_index"], width)
    for rows in _WARMUP_ROWS:
        x = np.zeros((rows, width), dtype=np.float32)
        try:
            out = np.asarray(session.run([binding.output], {binding.input: x})[0])
        except Exception as exc:
            raise RegistryError(
                f"{where}: warm-up on {rows}x{width} zeros failed: {_first_line(exc)}"
            ) from exc
        index = binding.output_index
        ok_2d = out.ndim == 2 and out.shape[0] == rows and index < out.shape[1]
        ok_1d = out.ndim == 1 and out.shape[0] == rows and index == 0
        if not (ok_2d or ok_1d):
            raise RegistryError(
                f"{where}: output {binding.output!r} has shape {out.shape} for {rows} rows; "
                f"output_index {index} does not pick one score per row"
            )
        if out.dtype.kind != "f":
            raise RegistryError(
                f"{where}: output {binding.output!r} is {out.dtype}, not a float score"
            )
    return binding


class LoadedModel:
    """One warmed-up model version. `score` is safe to call from any thread."""

    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        card: dict[str, Any],
        session: ort.InferenceSession,
        binding: _Binding,
        sha256: str,
        signature: Signature,
    ) -> None:
        self.name = name
        self.version = version
        self.number = version_number(version) or 0
        self.path = path
        self.card = card
        self.features: tuple[str, ...] = tuple(card["features"])
        self.sha256 = sha256
        self.signature = signature
        self._session = session
        self._input = binding.input
        self._outputs = [binding.output]
        self._index = binding.output_index
        # Request column order -> gather index (None: already the card's order).
        self._columns: dict[tuple[str, ...], np.ndarray | None] = {}

    @property
    def metrics(self) -> dict[str, float]:
        raw = self.card.get("metrics") or {}
        return {
            k: float(v)
            for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }

    def score(self, matrix: np.ndarray, columns: Sequence[str]) -> np.ndarray:
        """Positive-class float32 scores, one per row; columns are matched to features by name."""
        x = np.asarray(matrix, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(columns):
            raise ValueError(
                f"a matrix of shape {x.shape} does not match {len(columns)} column names"
            )
        key = tuple(columns)
        try:
            index = self._columns[key]
        except KeyError:
            index = self._column_index(key)
        x = np.ascontiguousarray(x) if index is None else np.take(x, index, axis=1)
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        out = self._session.run(self._outputs, {self._input: x})[0]
        scores = out[:, self._index] if out.ndim == 2 else out
        return np.ascontiguousarray(scores, dtype=np.float32)

    def _column_index(self, key: tuple[str, ...]) -> np.ndarray | None:
        if key == self.features:
            index = None
        else:
            position = {c: i for i, c in enumerate(key)}
            if len(position) != len(key):
                dups = sorted({c for c in key if key.count(c) > 1})
                raise ValueError(f"the request repeats column(s) {dups}")
            missing = [f for f in self.features if f not in position]
            if missing:
                raise ValueError(
                    f"missing column(s) {missing} that model {self.name} {self.version} needs "
                    f"(request columns: {list(key)})"
                )
            index = np.array([position[f] for f in self.features], dtype=np.intp)
        if len(self._columns) >= _COLUMN_CACHE_MAX:
            self._columns.clear()
        self._columns[key] = index
        return index


def _signature(vdir: Path) -> Signature:
    sig: list[int] = []
    for fname in (MODEL_FILE, CARD_FILE):
        try:
            st = (vdir / fname).stat()
        except OSError as exc:
            raise RegistryError(f"{vdir / fname}: cannot read: {exc.strerror}") from exc
        sig += [st.st_ino, st.st_size, st.st_mtime_ns]
    return tuple(sig)


def _load(name: str, vdir: Path, sig: Signature, prev: LoadedModel | None) -> LoadedModel:
    card_path, model_path = vdir / CARD_FILE, vdir / MODEL_FILE
    try:
        card = json.loads(card_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{card_path}: not a readable JSON card: {_first_line(exc)}") from exc
    _check_card(card, str(card_path))
    for key, want in (("name", name), ("version", vdir.name)):
        if card.get(key, want) != want:
            raise RegistryError(
                f"{card_path}: the card says {key} {card[key]!r} but the directory is {want!r}"
            )
    expected = card.get("onnx_sha256")
    if not isinstance(expected, str):
        raise RegistryError(f"{card_path}: the card has no onnx_sha256")
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{model_path}: cannot read: {exc.strerror}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise RegistryError(
            f"{model_path}: sha256 {digest[:16]}… does not match the card's onnx_sha256 "
            f"{expected[:16]}… (the file was replaced, corrupted or half-written)"
        )
    if prev is not None and prev.sha256 == digest and prev.card == card:
        prev.signature = sig  # touched but identical: keep the warm session
        return prev
    session = _session(data, str(model_path))
    binding = _bind(session, card, str(model_path))
    return LoadedModel(name, vdir.name, vdir, card, session, binding, digest, sig)


@dataclass(frozen=True)
class _State:
    models: dict[str, dict[str, LoadedModel]]
    latest: dict[str, LoadedModel]
    errors: dict[str, str]  # "name/version" -> why it is not (re)loaded
    aliases: dict[str, Aliases] = field(default_factory=dict)  # rollout.py


class ModelRegistry:
    """Loaded, warmed-up versions of every model under `root`; reads are lock-free."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._state = _State({}, {}, {})
        # Version dir -> (signature, error) of a failed load, so it is retried only on change.
        self._failed: dict[Path, tuple[Signature | None, str]] = {}
        self._lock = threading.Lock()

    def get(
        self, name: str, version: str | None = None, member: int | None = None
    ) -> LoadedModel:
        """The model's version. "", "latest" or None mean the highest loaded version, or,
        for a model with rollout aliases, the one `Aliases.route` picks for `member`;
        "stable" and "canary" name the aliases."""
        state = self._state
        versions = state.models.get(name)
        if versions is None:
            failures = [e for k, e in state.errors.items() if k.partition("/")[0] == name]
            detail = f"; its versions failed to load: {' | '.join(failures)}" if failures else ""
            raise ModelNotFoundError(
                f"model {name!r} is not loaded from the registry at {self.root}; "
                f"loaded models: {_describe(state)}{detail}"
            )
        aliases = state.aliases.get(name)
        if not version or version == LATEST:
            if aliases is None:
                return state.latest[name]
            version = aliases.route(name, member)
        elif version == STABLE:
            version = state.latest[name].version if aliases is None else aliases.stable
        elif version == CANARY:
            if aliases is None or aliases.canary is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no canary in the registry at {self.root}; set one "
                    f"with `edgeflow models canary {name} VERSION --share S`"
                )
            version = aliases.canary
        model = versions.get(version)
        if model is None:
            error = state.errors.get(f"{name}/{version}")
            detail = f"; it failed to load: {error}" if error else ""
            loaded = ", ".join(m.version for m in sorted(versions.values(), key=_order))
            raise ModelNotFoundError(
                f"model {name!r} has no loaded version {version!r} in the registry at "
                f"{self.root}; loaded versions: {loaded}{detail}"
            )
        return model

    def models(self) -> list[LoadedModel]:
        """Every loaded version, by name then version number."""
        return sorted((m for vs in self._state.models.values() for m in vs.values()), key=_order)

    def is_latest(self, model: LoadedModel) -> bool:
        return self._state.latest.get(model.name) is model

    def rollout(self, model: LoadedModel) -> tuple[list[str], float]:
        """The aliases this version holds and its share of members under the default
        version."""
        state = self._state
        newest = state.latest[model.name].version if model.name in state.latest else ""
        return traffic(state.aliases.get(model.name), model.version, newest)

    @property
    def errors(self) -> list[str]:
        return list(self._state.errors.values())

    def describe(self) -> str:
        return _describe(self._state)

    def refresh(self) -> list[str]:
        """Re-scan the registry; returns why each failing version is not (re)loaded."""
        with self._lock:
            old = self._state
            models: dict[str, dict[str, LoadedModel]] = {}
            errors: dict[str, str] = {}
            seen: set[Path] = set()
            for name, vdir in _scan(self.root):
                seen.add(vdir)
                prev = old.models.get(name, {}).get(vdir.name)
                loaded, error = self._load_one(name, vdir, prev)
                if loaded is not None:
                    models.setdefault(name, {})[vdir.name] = loaded
                if error:
                    errors[f"{name}/{vdir.name}"] = error
            for model in (m for vs in old.models.values() for m in vs.values()):
                if model.path not in seen:
                    log.info("model %s %s removed from %s", model.name, model.version, self.root)
            self._failed = {p: v for p, v in self._failed.items() if p in seen}
            latest = {n: max(vs.values(), key=_order) for n, vs in models.items()}
            aliases = self._read_aliases(models, old.aliases, errors)
            self._state = _State(models, latest, errors, aliases)
            return list(errors.values())

    def _read_aliases(
        self,
        models: dict[str, dict[str, LoadedModel]],
        old: dict[str, Aliases],
        errors: dict[str, str],
    ) -> dict[str, Aliases]:
        """Each model's rollout aliases. A broken file keeps the aliases read before while
        their versions are loaded (else the newest version serves), and says so."""
        out: dict[str, Aliases] = {}
        for name, versions in models.items():
            try:
                found = read_aliases(self.root, name, set(versions))
            except RolloutError as exc:
                before = old.get(name)
                if before is not None and {before.stable, before.canary} - {None} <= set(versions):
                    out[name] = before
                    errors[f"{name}/{ALIASES_FILE}"] = f"{exc} (keeping stable {before.stable})"
                else:
                    errors[f"{name}/{ALIASES_FILE}"] = f"{exc} (serving the newest version)"
                continue
            if found is not None:
                if old.get(name) != found:
                    log.info("model %s rollout: %s", name, found.as_json())
                out[name] = found
        return out

    def _load_one(
        self, name: str, vdir: Path, prev: LoadedModel | None
    ) -> tuple[LoadedModel | None, str]:
        sig: Signature | None = None
        try:
            sig = _signature(vdir)
            if prev is not None and prev.signature == sig:
                return prev, ""
            cached = self._failed.get(vdir)
            if cached is not None and cached[0] == sig:
                return prev, cached[1]
            loaded = _load(name, vdir, sig, prev)
        except RegistryError as exc:
            error = str(exc)
            if prev is not None:
                error += f" (still serving {name} {vdir.name} as loaded before)"
            if self._failed.get(vdir) != (sig, error):
                log.error("model refused: %s", error)
            self._failed[vdir] = (sig, error)
            return prev, error
        self._failed.pop(vdir, None)
        if loaded is not prev:
            verb = "reloaded" if prev is not None else "loaded"
            log.info("%s model %s %s from %s", verb, name, vdir.name, vdir)
        return loaded, ""


def _order(model: LoadedModel) -> tuple[str, int]:
    return model.name, model.number


def _describe(state: _State) -> str:
    parts = [
        f"{name} ({', '.join(m.version for m in sorted(vs.values(), key=_order))})"
        for name, vs in sorted(state.models.items())
    ]
    return ", ".join(parts) or "none"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"card value {value!r} ({type(value).__name__}) is not JSON-serialisable")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_model(model_dir: Path, name: str, onnx_bytes: bytes, card: Mapping[str, Any]) -> str:
    """Validate, then publish as the next version ("v1", "v2", ...); returns that version.

    The card gains "version", "created_at" and "onnx_sha256". Files are written to a temp dir
    that is renamed into place, so a reader sees the whole version or nothing.
    """
    if not _NAME_RE.match(name):
        raise RegistryError(
            f"model name {name!r} is invalid: use letters, digits, '_', '.' and '-'"
        )
    where = f"model {name!r} published to {model_dir}"
    full = dict(card)
    _check_card(full, where)
    if full.setdefault("name", name) != name:
        raise RegistryError(f"{where}: the card's name {full['name']!r} differs from {name!r}")
    _bind(_session(onnx_bytes, where), full, where)
    full["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    full["created_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    name_dir = model_dir / name
    name_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=name_dir))
    try:
        tmp.chmod(0o755)
        _write(tmp / MODEL_FILE, onnx_bytes)
        while True:
            existing = _version_dirs(name_dir)
            version = f"v{existing[-1][0] + 1 if existing else 1}"
            full["version"] = version
            text = json.dumps(full, indent=2, default=_json_default) + "\n"
            _write(tmp / CARD_FILE, text.encode())
            try:
                os.rename(tmp, name_dir / version)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # a concurrent publisher took this version number
                raise
            _fsync_dir(name_dir)
            log.info("published model %s %s to %s", name, version, name_dir / version)
            return version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
