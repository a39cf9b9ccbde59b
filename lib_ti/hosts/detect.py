"""Which webui is this? Decided by what its loaded modules and its model object offer, never by its name.

``detect_host`` is a pure function of a ``sys.modules``-like mapping and ``shared.sd_model`` (or None
while no checkpoint is loaded): it imports nothing and only reads attributes, so plain fakes test it.
The families (``hosts.md`` in the project's reference notes):

* ``a1111``: ldm/sgm model with ``cond_stage_model`` and A1111's global ``sd_hijack`` embedding database.
* ``reforge``: A1111's model shell with a Forge UNet attached (``forge_objects`` beside
  ``cond_stage_model``; ``modules_forge`` and ``ldm_patched`` loaded): reForge, Forge Classic.
* ``forge``: Forge's own engine (``forge_objects`` and ``text_processing_engine[_l/_g]``, no
  ``cond_stage_model``, no global embedding database; the ``backend`` package): Forge, Forge Neo.
* ``diffusers`` (unsupported): a diffusers pipeline as the model (SD.Next).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NAMES = {"a1111": "AUTOMATIC1111", "reforge": "reForge (A1111's model shell with a Forge UNet)",
         "forge": "Forge (its own diffusion engine)", "diffusers": "a diffusers-based webui (SD.Next)",
         "unknown": "this webui"}
FORGE_TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


@dataclass(frozen=True)
class Detection:
    kind: str  # a1111 | reforge | forge | diffusers | unknown
    reason: str = ""  # why no adapter can train here; "" for a known family

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, self.kind)

    def __str__(self) -> str:
        return f"unsupported: {self.reason}" if self.reason else self.kind


def detect_host(modules: Mapping[str, object], sd_model: object | None = None) -> Detection:
    """The host family, from the loaded model's shape when one is loaded, else from the loaded modules."""
    by_model = _by_model(sd_model) if sd_model is not None else None
    return by_model or _by_modules(modules)


def _by_model(sd_model: object) -> Detection | None:
    has = _has(sd_model)
    if has("unet") and has("text_encoder") and not has("cond_stage_model"):
        return Detection("diffusers", f"the loaded model is a diffusers pipeline ({type(sd_model).__name__}), "
                                      "which the extension cannot train yet (it trains A1111-style ldm/sgm models)")
    if has("forge_objects") and any(has(name) for name in FORGE_TEXT_ENGINES):
        return Detection("forge")
    if has("cond_stage_model"):
        return Detection("reforge" if has("forge_objects") else "a1111")
    return None  # a model object of no known shape: the modules decide (and say what is missing)


def _by_modules(modules: Mapping[str, object]) -> Detection:
    if "backend.diffusion_engine" in modules or "backend.memory_management" in modules:
        return Detection("forge")
    if "modules_forge" in modules or "ldm_patched" in modules:
        return Detection("reforge")
    hijack = getattr(modules.get("modules.sd_hijack"), "model_hijack", None)
    if getattr(hijack, "embedding_db", None) is not None:
        return Detection("a1111")
    return Detection("unknown", "this webui has neither AUTOMATIC1111's embedding database "
                                "(modules.sd_hijack.model_hijack.embedding_db) nor Forge's backend, so the "
                                "extension cannot register the embedding it trains")


def _has(obj: object):
    """``has(name)``: the attribute exists and is not None (Forge sets ``cond_stage_model = None``)."""
    return lambda name: getattr(obj, name, None) is not None
