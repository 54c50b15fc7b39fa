"""Endpoints of remote model servers in workflows: host:port, or read from the environment.

A workflow is the same file locally and in a cluster, where the model server's address
differs, so an endpoint may name environment variables of the process that calls it:
`${SCORING_ADDR}` (must be set) or `${SCORING_ADDR:-127.0.0.1:50063}` (with a default).
The syntax is checked when the workflow is validated; the variables are read when called.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")
_HOST_PORT = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})$"
)
FORMS = "host:port, ${VAR} or ${VAR:-host:port}"
# Comma-separated host:port patterns (fnmatch: `*.models.svc:8001`) the gateway may call for
# scoring.remote; unset or empty: any (the chart sets it, to its own scoring service and
# what remoteScoring.allowedEndpoints adds).
ALLOW_ENV = "EDGEFLOW_REMOTE_ENDPOINTS"


def allow_list(env: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(ALLOW_ENV, "").split(",") if p.strip())


def allowed(address: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(address, p) for p in patterns)


def _check_address(address: str, what: str) -> None:
    match = _HOST_PORT.match(address)
    if match is None:
        raise ValueError(f"{what} {address!r} is not host:port")
    if not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"{what} {address!r} has port {match.group(1)}, not in 1..65535")


def check(endpoint: str) -> str:
    """The endpoint if its syntax is valid; ValueError says what is wrong."""
    if not endpoint:
        raise ValueError(f"an endpoint is required: {FORMS}")
    if "$" in _VAR.sub("", endpoint):
        raise ValueError(f"{endpoint!r}: '$' must start ${{VAR}} or ${{VAR:-default}}")
    whole = _VAR.fullmatch(endpoint)
    if whole is not None:
        if whole.group(2) is not None:
            _check_address(whole.group(2), f"the default of {endpoint!r}")
        return endpoint
    if not _VAR.search(endpoint):
        _check_address(endpoint, "endpoint")
    return endpoint


def expand(endpoint: str, env: Mapping[str, str]) -> str:
    """The host:port the endpoint names now; ValueError names an unset variable or bad value."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name, "").strip()
        if found:
            return found
        if default is None:
            raise ValueError(f"endpoint {endpoint!r}: environment variable {name} is not set")
        return default

    address = _VAR.sub(value, endpoint)
    if address != endpoint:
        _check_address(address, f"endpoint {endpoint!r} resolved to")
    else:
        _check_address(address, "endpoint")
    return address
