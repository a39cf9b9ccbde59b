"""Webui entry point: registers the Train Embedding tab. All logic lives in lib_ti (importable without a webui)."""

from modules import script_callbacks

from lib_ti.hosts.webui_tab import on_ui_tabs, on_ui_train_tabs

# SD.Next has no on_ui_train_tabs, and Forge never fires it: on_ui_tabs covers those hosts.
if hasattr(script_callbacks, "on_ui_train_tabs"):
    script_callbacks.on_ui_train_tabs(on_ui_train_tabs)
script_callbacks.on_ui_tabs(on_ui_tabs)
