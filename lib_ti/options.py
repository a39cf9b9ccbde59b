"""Declaring an option once: its default, help text, label and UI group live on the dataclass field.

``TrainConfig``, ``PrepareOptions`` and ``CaptionOptions`` declare their fields with ``option(...)``;
the command line (``cli.fields``), the webui tabs and the benchmarks read the same metadata, so a
new option is written in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, field
from typing import Any


def option(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None, label: str = "",
           section: str = "", ui: bool = True, **extra: Any) -> Any:
    """A dataclass field with its ``help`` (CLI --help, UI tooltip), ``label`` (UI; default: from the name),
    ``section`` (UI group), ``ui`` (False: not a control in the webui tabs) and ``extra`` metadata."""
    meta = {"help": help, "label": label, "section": section, "ui": ui, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_help(f: Field) -> str:
    return str(f.metadata.get("help", ""))


def field_label(f: Field) -> str:
    return str(f.metadata.get("label") or f.name.replace("_", " ").capitalize())
