"""The adapters, by host family, and the one for the running webui.

Adding a host is one new module with a ``HOST`` object implementing ``hosts.host.Host``, plus its
line in ``ADAPTERS`` (the README's Contributing section says how). A family ``detect`` recognises
but no adapter serves gets an ``UnsupportedHost`` saying so, in one sentence, instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys

from .detect import Detection, detect_host
from .host import Host, UnsupportedHost

# family (detect.detect_host's kind) -> the module whose HOST serves it; imported when first needed.
ADAPTERS: dict[str, str] = {
    "a1111": "lib_ti.hosts.a1111",
    "forge": "lib_ti.hosts.forge",
    "reforge": "lib_ti.hosts.reforge",
}


def host_for(detection: Detection) -> Host:
    """The adapter for a detected family, or an ``UnsupportedHost`` naming what is missing."""
    if detection.reason:
        return UnsupportedHost(detection.name, f"cannot train in {detection.name}: {detection.reason}.")
    module = ADAPTERS.get(detection.kind)
    if module is None:
        return UnsupportedHost(detection.name, f"cannot train in {detection.name} yet: this version of "
                                               "the extension has no adapter for it (it trains in AUTOMATIC1111).")
    return importlib.import_module(module).HOST


def current_host() -> Host:
    """The adapter for the running webui, chosen by what its modules and loaded model offer."""
    return host_for(detect_host(sys.modules, loaded_sd_model()))


def loaded_sd_model():
    """The loaded checkpoint's model object without loading one (``shared.sd_model`` would load it)."""
    from modules import sd_models, shared

    return sd_models.model_data.sd_model if hasattr(sd_models, "model_data") else shared.sd_model
