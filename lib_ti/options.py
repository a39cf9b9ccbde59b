"""Declaring an option once: its default, help text, label and UI group live on the dataclass field.

``TrainConfig``, ``PrepareOptions`` and ``CaptionOptions`` declare their fields with ``option(...)``;
the command line (``cli.fields``), the webui tabs and the benchmarks read the same metadata, so a
new option is written in one place.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import Field, field
from typing import Any, Literal, NoReturn

from .errors import TIError, shown


def option(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None, label: str = "",
           section: str = "", ui: bool = True, **extra: Any) -> Any:
    """A dataclass field with its ``help`` (CLI --help, UI tooltip), ``label`` (UI; default: from the name),
    ``section`` (UI group), ``ui`` (False: not a control in the webui tabs) and ``extra`` metadata (``ui_help``:
    the UI's own help text where ``help`` speaks of flags or empty values)."""
    meta = {"help": help, "label": label, "section": section, "ui": ui, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_help(f: Field) -> str:
    return str(f.metadata.get("help", ""))


def field_ui_help(f: Field) -> str:
    """The help a UI shows: ``ui_help`` where the command-line wording (flags, "" and [] values) would not fit."""
    return str(f.metadata.get("ui_help") or f.metadata.get("help", ""))


def field_label(f: Field) -> str:
    return str(f.metadata.get("label") or f.name.replace("_", " ").capitalize())


def bad(owner: str, name: str, value: Any, fix: str) -> NoReturn:
    """The one message for a bad option: ``config width=100 is invalid: use a multiple of 8 ...``.

    The value is shown cut short (``errors.shown``): a huge or deeply nested value never floods the message.
    """
    raise TIError(f"{owner} {name}={shown(value)} is invalid: {fix}")


def check_types(obj: Any, owner: str) -> None:
    """Check each field of the dataclass ``obj`` against its annotation: Literal choices, list items, bools
    apart from ints. Ints are taken for floats (YAML writes 5, not 5.0), numbers for strings
    ("learning_rate: 0.005" in YAML is a float)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        origin = typing.get_origin(hint)
        if origin is Literal:
            if value not in typing.get_args(hint):
                bad(owner, name, value, f"choose one of {', '.join(map(str, typing.get_args(hint)))}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, name, float(value))
        elif hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            object.__setattr__(obj, name, str(value))
        elif origin is list:
            (item,) = typing.get_args(hint)
            if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
                bad(owner, name, value, f"give a list of {item.__name__}")
        elif origin is None and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
            bad(owner, name, value, f"expected {hint.__name__}")
