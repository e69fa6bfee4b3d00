"""The engine's error family: every error a user can act on derives from ``GPDError``.

Each command-line tool catches ``GPDError`` (and ``OSError``) once and prints the message
as one line; anything else is a bug and keeps its traceback. Subclasses also derive from
the built-in exception their callers have always caught (ValueError, RuntimeError).
"""


class GPDError(Exception):
    """A problem with the user's input, files or machine, with a message naming the fix."""
