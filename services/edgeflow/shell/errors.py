"""The one error a request handler raises to fail its call with a status.

Handlers raise RequestError, with the status code and a message naming what was wrong and
where; the server shell (edgeflow.shell.tracing.ServerTracing, around every handler) turns it into
the call's status, as it does work refused because the call's deadline had passed
(edgeflow.shell.cpu.DeadlineExpired -> DEADLINE_EXCEEDED). No handler calls context.abort.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that fails with a gRPC status code and a message naming what and where."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
