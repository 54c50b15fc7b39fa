"""The `edgeflow` command line."""


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""
