"""One error type and one message prefix for everything a user can get wrong."""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from typing import NoReturn

PREFIX = "[TI Trainer]"


class TIError(ValueError):
    """A problem the user can fix: the message names the bad value and the fix.

    Subclasses ValueError so callers that already catch bad input keep working.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(PREFIX) else f"{PREFIX} {message}")


class WriteError(TIError):
    """A file could not be written (disk full, file-size limit, permissions): the message names the file."""


def warn(message: str) -> None:
    """Print a non-fatal warning with the project prefix (to stderr, flushed)."""
    say(f"warning: {message}")


def say(message: str) -> None:
    """Tell the user what is happening (loading a model, ...), with the project prefix, on stderr."""
    import sys

    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def exit_with(main: Callable[[], int]) -> NoReturn:
    """The ``python -m`` entry of a module with a ``main`` of its own: its exit code, or for a TIError the
    one-line message on stderr and exit code 2."""
    import sys

    try:
        code = main()
    except TIError as exc:
        print(str(exc), file=sys.stderr)
        code = 2
    sys.exit(code)


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 80, 80
_SHOWN.maxlong = 40
SHOWN_MAX = 160  # characters


def shown(value: object) -> str:
    """``repr(value)`` cut short: a message never grows with its value (a 10 MB string, a YAML alias bomb)."""
    text = _SHOWN.repr(value)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 3] + "..."
