"""Errors that reach the user as one sentence."""


class UserError(Exception):
    """A bad input or a refused request.

    The message is one sentence that names the input (file, row, option) and says how to fix it.
    The CLI prints it on stderr and exits with status 2; nothing half-written is left behind.
    """
