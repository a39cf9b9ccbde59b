"""One error type and one message prefix for everything a user can get wrong."""

from __future__ import annotations

PREFIX = "[TI Trainer]"


class TIError(ValueError):
    """A problem the user can fix: the message names the bad value and the fix.

    Subclasses ValueError so callers that already catch bad input keep working.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(PREFIX) else f"{PREFIX} {message}")


def warn(message: str) -> None:
    """Print a non-fatal warning with the project prefix (to stderr, flushed)."""
    say(f"warning: {message}")


def say(message: str) -> None:
    """Tell the user what is happening (loading a model, ...), with the project prefix, on stderr."""
    import sys

    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)
