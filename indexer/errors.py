"""Errors that reach the user as one sentence."""


class UserError(Exception):
    """A bad input or a refused request.

    The message is one sentence that names the input (file, row, option) and says how to fix it.
    The CLI prints it on stderr and exits with status 2; nothing half-written is left behind.
    """


class Unavailable(UserError):
    """The database cannot answer now for a reason that is not the request's: its files are damaged,
    its disk is full or its folder read-only. Still one sentence (exit status 2 on the CLI); the
    HTTP API answers 503."""
