"""Errors that mean "the input or environment is wrong", not "cineray has a bug".

The CLI prints these (and ValueError / FileNotFoundError from user input) as one line on stderr,
``error: <what> <fix>``, with exit code 2 and no traceback. Messages name the field or value and
say how to fix it.
"""


class UserError(Exception):
    """Bad input or environment that the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the key's full path and the fix."""
