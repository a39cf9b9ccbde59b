"""Gradio controls generated from the option dataclasses (``TrainConfig``, ``PrepareOptions``, ...).

Each field's label, tooltip and section come from its ``option(...)`` metadata and its control from
its type, so the tabs show every option of the core with the core's own words, and a new option
needs no UI code. Values come back through ``values_to_options``, which turns Gradio's floats back
into the fields' types.
"""

from __future__ import annotations

import typing
from dataclasses import Field, fields
from typing import Any

from ..options import field_label, field_ui_help


def ui_fields(cls: type, section: str | None = None) -> list[Field]:
    """The fields of ``cls`` shown as controls (``ui`` metadata), optionally of one ``section``, in declared order."""
    return [f for f in fields(cls) if f.metadata.get("ui", True) and section in (None, f.metadata.get("section"))]


def sections(cls: type) -> list[str]:
    """The sections of ``cls``'s controls, in the order their first field is declared."""
    return list(dict.fromkeys(f.metadata.get("section", "") for f in ui_fields(cls)))


def widget(cls: type, f: Field, default: Any, elem_id: str, **overrides: Any):
    """The Gradio control for field ``f``: dropdown for a Literal, checkbox for a bool, number, else text."""
    import gradio as gr

    hint = typing.get_type_hints(cls)[f.name]
    kwargs: dict[str, Any] = {"label": field_label(f), "info": field_ui_help(f), "elem_id": elem_id} | overrides
    if typing.get_origin(hint) is typing.Literal:
        return gr.Dropdown(choices=list(typing.get_args(hint)), value=default, **kwargs)
    if typing.get_origin(hint) is list and f.metadata.get("choices"):
        return gr.CheckboxGroup(choices=list(f.metadata["choices"]), value=default, **kwargs)
    if hint is bool:
        return gr.Checkbox(value=default, **kwargs)
    if hint is int:
        return gr.Number(value=default, precision=0, **kwargs)
    if hint is float:
        return gr.Number(value=default, **kwargs)
    return gr.Textbox(value=default, **kwargs)


def values_to_options(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Gradio's values as the fields' types: whole floats become ints where the field is an int, None becomes ""."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        if hints[name] is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif hints[name] is str and value is None:
            value = ""
        out[name] = value
    return out


def keep_out_of_ui_config(block: Any) -> None:
    """Mark ``block`` and every component inside it ``do_not_save_to_config``: the webui keys its ui-config.json
    by tab and label ("train/Max steps/value"), so without this our controls would take the defaults of the
    host's own Train tab controls of the same label (Max steps 100000, 512x512), not ours and the model's."""
    block.do_not_save_to_config = True
    for child in getattr(block, "children", []) or []:
        keep_out_of_ui_config(child)
