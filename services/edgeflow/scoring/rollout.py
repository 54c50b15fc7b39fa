"""Safe model rollout: the `stable` and `canary` aliases of a model and the canary's share.

`<model_dir>/<name>/aliases.json` holds {"stable": "v3", "canary": "v4", "canary_share":
0.1, "history": ["v1", "v2"]}. A model without the file serves its newest version, as it
always has; the first `canary` writes it, with the version serving before the canary as
stable. With it, the default version ("" or "latest") is routed: `canary_share` of the
members (a salted hash of the member id, so a member stays on one side) get the canary,
everyone else the stable version, and a newly published version takes no traffic until it is
made the canary. `stable` and `canary` can also be named as versions. `history` lists earlier
stable versions, newest last, for `rollback`.

The file is replaced whole (written, fsynced, renamed), so a scoring process that re-scans
the registry sees the old aliases or the new ones.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeflow.workflow.assign import BUCKETS, bucket

ALIASES_FILE = "aliases.json"
STABLE = "stable"
CANARY = "canary"
_HISTORY_MAX = 20


class RolloutError(ValueError):
    """An aliases file or a rollout command that cannot apply; the message says why."""


@dataclass(frozen=True)
class Aliases:
    stable: str
    canary: str | None = None
    canary_share: float = 0.0
    history: tuple[str, ...] = field(default=())

    def route(self, name: str, member: int | None) -> str:
        """The version a request for `member` gets. Without a member (a batch run) the
        stable version: the canary's share is a share of members."""
        if self.canary is None or self.canary_share <= 0 or member is None:
            return self.stable
        salt = f"canary:{name}:{self.canary}"
        return self.canary if bucket(salt, member) < self.share_buckets else self.stable

    @property
    def share_buckets(self) -> int:
        return round(self.canary_share * BUCKETS)

    def as_json(self) -> dict[str, Any]:
        return {
            "stable": self.stable,
            "canary": self.canary,
            "canary_share": self.canary_share,
            "history": list(self.history),
        }


def traffic(aliases: Aliases | None, version: str, newest: str) -> tuple[list[str], float]:
    """The aliases `version` holds and its share of members under the default version."""
    if aliases is None:
        return [], 1.0 if version == newest else 0.0
    held = [a for a, v in ((STABLE, aliases.stable), (CANARY, aliases.canary)) if v == version]
    canary = aliases.share_buckets / BUCKETS if aliases.canary else 0.0
    share = (1.0 - canary) * (version == aliases.stable) + canary * (version == aliases.canary)
    return held, share


def aliases_path(model_dir: Path, name: str) -> Path:
    return model_dir / name / ALIASES_FILE


def read_aliases(model_dir: Path, name: str, versions: set[str]) -> Aliases | None:
    """The model's aliases, None without a file. RolloutError names the file and what is
    wrong with it, including an alias naming a version not in `versions`."""
    path = aliases_path(model_dir, name)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RolloutError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise RolloutError(f"{path}: must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"stable", "canary", "canary_share", "history"})
    if unknown:
        raise RolloutError(f"{path}: unknown field(s) {unknown}")
    stable, canary, share = raw.get("stable"), raw.get("canary"), raw.get("canary_share", 0.0)
    history = raw.get("history", [])
    for label, value in (("stable", stable), ("canary", canary)):
        if value is None and label == "canary":
            continue
        if not isinstance(value, str) or value not in versions:
            raise RolloutError(
                f"{path}: {label} {value!r} is not a loaded version of {name} "
                f"(loaded: {', '.join(sorted(versions, key=_number)) or 'none'})"
            )
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise RolloutError(f"{path}: canary_share must be a number in [0, 1], got {share!r}")
    if not isinstance(history, list) or not all(isinstance(v, str) for v in history):
        raise RolloutError(f"{path}: history must be a list of versions")
    return Aliases(str(stable), canary, float(share), tuple(history))


def write_aliases(model_dir: Path, name: str, aliases: Aliases) -> None:
    path = aliases_path(model_dir, name)
    fd, tmp = tempfile.mkstemp(prefix=".aliases-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(aliases.as_json(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _number(version: str) -> int:
    return int(version[1:]) if version[1:].isdigit() else 0


def _current(model_dir: Path, name: str, versions: list[str]) -> Aliases:
    """The aliases on disk, or what serving does without them (stable = the newest)."""
    if not versions:
        raise RolloutError(f"model {name!r} has no published version in {model_dir}")
    found = read_aliases(model_dir, name, set(versions))
    return found if found is not None else Aliases(stable=versions[-1])


def set_canary(
    model_dir: Path, name: str, versions: list[str], version: str, share: float
) -> Aliases:
    """Make `version` the canary with `share` of the members (0 < share <= 1)."""
    if not math.isfinite(share) or not 0 < share <= 1:
        raise RolloutError(f"--share must be in (0, 1], got {share}")
    if version not in versions:
        raise RolloutError(
            f"model {name!r} has no version {version!r} in {model_dir} "
            f"(published: {', '.join(versions) or 'none'})"
        )
    now = _current(model_dir, name, versions)
    if not aliases_path(model_dir, name).exists():
        # The first rollout: the stable version is the one serving before `version`.
        earlier = [v for v in versions if v != version]
        if not earlier:
            raise RolloutError(f"{name} {version} is the only version: there is no stable one")
        now = Aliases(stable=earlier[-1])
    if version == now.stable:
        raise RolloutError(f"{name} {version} is already the stable version")
    new = Aliases(now.stable, version, share, now.history)
    write_aliases(model_dir, name, new)
    return new


def promote(model_dir: Path, name: str, versions: list[str]) -> Aliases:
    """The canary becomes the stable version and takes every member."""
    now = _current(model_dir, name, versions)
    if now.canary is None:
        raise RolloutError(
            f"model {name!r} has no canary to promote (stable is {now.stable}); "
            f"set one with `edgeflow models canary {name} VERSION --share S`"
        )
    history = (*now.history, now.stable)[-_HISTORY_MAX:]
    new = Aliases(now.canary, None, 0.0, history)
    write_aliases(model_dir, name, new)
    return new


def rollback(model_dir: Path, name: str, versions: list[str]) -> Aliases:
    """Drop the canary if there is one; otherwise the previous stable version is stable
    again. Either way the version that was taking traffic last stops at once."""
    now = _current(model_dir, name, versions)
    if now.canary is not None:
        new = Aliases(now.stable, None, 0.0, now.history)
    else:
        earlier = [v for v in now.history if v in versions and v != now.stable]
        if not earlier:
            raise RolloutError(
                f"model {name!r} has no canary and no earlier stable version to roll back to "
                f"(stable is {now.stable})"
            )
        keep = now.history[: now.history.index(earlier[-1])]
        new = Aliases(earlier[-1], None, 0.0, keep)
    write_aliases(model_dir, name, new)
    return new
