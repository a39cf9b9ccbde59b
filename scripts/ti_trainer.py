"""Webui entry point: registers the tab, the settings and the API.

All logic lives in lib_ti (importable without a webui).
"""

from modules import script_callbacks

from lib_ti.hosts.webui_tab import on_ui_tabs, on_ui_train_tabs


def _on_ui_settings():
    from lib_ti.hosts import settings

    settings.register_settings()


def _on_app_started(_demo, app):
    from lib_ti.hosts import settings, webui_api

    if settings.api_enabled():
        webui_api.mount(app)


# SD.Next has no on_ui_train_tabs, and Forge never fires it: on_ui_tabs covers those hosts.
if hasattr(script_callbacks, "on_ui_train_tabs"):
    script_callbacks.on_ui_train_tabs(on_ui_train_tabs)
script_callbacks.on_ui_tabs(on_ui_tabs)
if hasattr(script_callbacks, "on_ui_settings"):
    script_callbacks.on_ui_settings(_on_ui_settings)
if hasattr(script_callbacks, "on_app_started"):
    script_callbacks.on_app_started(_on_app_started)
