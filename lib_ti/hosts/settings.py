"""The extension's own settings in the webui's Settings page, and the host's API switches and credentials.

Shared by every A1111-style webui: ``shared.opts``/``OptionInfo``/``options_section`` and the
``--api``/``--api-auth`` flags are the same in A1111, reForge and Forge.
"""

from __future__ import annotations

import os
from dataclasses import Field, fields

from ..config import TrainConfig
from ..options import field_label, field_ui_help

SETTINGS_SECTION = ("ti_trainer", "TI Trainer", "training")

# The extension's own settings: key (prefixed ti_trainer_ in the host) -> (default, label). Config fields
# marked ``setting`` get a setting too: the default the tab starts from (``config_defaults``).
HOST_SETTINGS: dict[str, tuple[object, str]] = {
    "output_dir": ("", "Folder for training runs (checkpoints, previews, loss logs); empty = "
                       "textual_inversion/ti-trainer in the data folder. --ti-trainer-output-dir wins"),
    "checkpoint_subdir": ("ti-trainer", "Sub-folder of the embeddings folder for checkpoint copies (name-STEP)"),
    "allowed_roots": ("", "Extra folders API requests may read datasets, templates and embeddings from, besides "
                          f"the webui's data folder; separated by '{os.pathsep}' or new lines. "
                          "--ti-trainer-allowed-roots adds more"),
}
# Settings that name folders: never changed through the API (/sdapi/v1/options), and frozen by the host's
# --hide-ui-dir-config like its own folder settings; else a request could move the folders it is confined to.
PATH_SETTINGS = ("output_dir", "checkpoint_subdir", "allowed_roots")


def _setting_fields() -> list[Field]:
    return [f for f in fields(TrainConfig) if f.metadata.get("setting")]


def settings_table() -> dict[str, tuple[object, str]]:
    table = dict(HOST_SETTINGS)
    for f in _setting_fields():
        table[f.name] = (f.default, f"Default: {field_label(f)} ({field_ui_help(f)})")
    return table


def register_settings() -> None:
    """Our own section of the webui's Settings, under the "training" category; keys prefixed ti_trainer_."""
    import typing

    import gradio as gr
    from modules import shared

    hints = typing.get_type_hints(TrainConfig)
    options = {}
    for key, (default, label) in settings_table().items():
        if key in hints and typing.get_origin(hints[key]) is typing.Literal:
            options[key] = shared.OptionInfo(default, label, gr.Radio, {"choices": list(typing.get_args(hints[key]))})
        else:
            options[key] = shared.OptionInfo(default, label)
        if key in PATH_SETTINGS:
            options[key].restrict_api = True  # read by the host's Options.set (webui >= 1.7)
    for key, info in shared.options_section(SETTINGS_SECTION, options).items():
        shared.opts.add_option(f"ti_trainer_{key}", info)
    if isinstance(shared.restricted_opts, set):
        shared.restricted_opts.update(f"ti_trainer_{key}" for key in PATH_SETTINGS)


def setting(key: str):
    from modules import shared

    return shared.opts.data.get(f"ti_trainer_{key}", settings_table()[key][0])


def config_defaults() -> dict[str, object]:
    """The config fields whose defaults the webui owner set in Settings."""
    return {f.name: setting(f.name) for f in _setting_fields()}


def api_credentials() -> dict[str, str]:
    """--api-auth "user:pass,user2:pass2", parsed as the host's Api class does."""
    from modules import shared

    creds = {}
    for pair in (shared.cmd_opts.api_auth or "").split(","):
        if ":" in pair:
            user, password = pair.strip().split(":", 1)
            creds[user] = password
    return creds


def api_enabled() -> bool:
    from modules import shared

    return bool(shared.cmd_opts.api or shared.cmd_opts.nowebui)
