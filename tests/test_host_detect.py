"""Which webui is this: ``detect_host`` decides by capability, from plain fakes of modules and models.

The fakes carry exactly the attributes hosts.md (the project's reference notes, §1.2 and §2) gives each
host's model object and modules; nothing here imports a webui.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lib_ti.errors import TIError
from lib_ti.hosts import registry
from lib_ti.hosts.detect import detect_host
from lib_ti.hosts.host import Host, UnsupportedHost

A1111_MODULES = {"modules.sd_hijack": SimpleNamespace(model_hijack=SimpleNamespace(embedding_db=object()))}
REFORGE_MODULES = {**A1111_MODULES, "modules_forge": object(), "ldm_patched": object()}
# Forge: modules.sd_hijack.model_hijack is a stub without embedding_db; the backend package holds the engine.
FORGE_MODULES = {"modules.sd_hijack": SimpleNamespace(model_hijack=SimpleNamespace()), "modules_forge": object(),
                 "backend.diffusion_engine": object(), "backend.memory_management": object()}


def a1111_model():
    return SimpleNamespace(cond_stage_model=object(), model=SimpleNamespace(diffusion_model=object()))


def reforge_model():  # A1111's ldm/sgm shell, its UNet and VAE replaced, forge_objects attached
    return SimpleNamespace(cond_stage_model=object(), forge_objects=SimpleNamespace(unet=object()))


def forge_model(sdxl: bool = False):  # backend.diffusion_engine: cond_stage_model = None (base.py:61)
    engines = {"text_processing_engine_l": object(), "text_processing_engine_g": object()} if sdxl else \
        {"text_processing_engine": object()}
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=object()), cond_stage_model=None,
                           first_stage_model=None, **engines)


def sdnext_model():  # a diffusers pipeline
    return SimpleNamespace(unet=object(), text_encoder=object(), tokenizer=object(), vae=object())


@pytest.mark.parametrize(("modules", "model", "kind"), [
    (A1111_MODULES, a1111_model(), "a1111"),
    (A1111_MODULES, None, "a1111"),  # the UI is built while the first checkpoint still loads
    (REFORGE_MODULES, reforge_model(), "reforge"),
    (REFORGE_MODULES, None, "reforge"),
    (A1111_MODULES, reforge_model(), "reforge"),  # the model alone tells it
    (FORGE_MODULES, forge_model(), "forge"),
    (FORGE_MODULES, forge_model(sdxl=True), "forge"),
    (FORGE_MODULES, None, "forge"),
    (REFORGE_MODULES, forge_model(), "forge"),  # Forge keeps modules_forge too: the engine decides
])
def test_each_family_is_told_by_what_it_offers(modules, model, kind):
    assert str(detect_host(modules, model)) == kind


def test_a_diffusers_pipeline_is_unsupported_and_says_why():
    detection = detect_host({}, sdnext_model())
    assert detection.kind == "diffusers" and str(detection).startswith("unsupported: the loaded model is a diffusers")


def test_a_webui_with_neither_database_nor_backend_is_unsupported():
    detection = detect_host({"modules.sd_hijack": SimpleNamespace(model_hijack=SimpleNamespace())},
                            SimpleNamespace(something_else=True))
    assert detection.kind == "unknown" and "embedding database" in detection.reason
    assert detect_host({}).kind == "unknown"


def test_detection_reads_capabilities_not_names():
    """A model whose class is called like Forge's but offers A1111's shape is A1111's."""
    ForgeDiffusionEngine = type("ForgeDiffusionEngine", (), {"cond_stage_model": object()})  # noqa: N806
    assert str(detect_host({}, ForgeDiffusionEngine())) == "a1111"


def test_a1111_forge_and_reforge_get_their_adapters_and_every_other_family_one_sentence():
    host = registry.host_for(detect_host(A1111_MODULES, a1111_model()))
    assert isinstance(host, Host) and host.name == "AUTOMATIC1111" and host.reason == ""
    host = registry.host_for(detect_host(REFORGE_MODULES, reforge_model()))
    assert isinstance(host, Host) and host.name == "reForge" and host.reason == ""
    forge = registry.host_for(detect_host(FORGE_MODULES, forge_model()))
    assert isinstance(forge, Host) and forge.name == "Forge" and forge.reason == ""
    for modules, model in [({}, sdnext_model()), ({}, None)]:
        host = registry.host_for(detect_host(modules, model))
        assert isinstance(host, UnsupportedHost) and isinstance(host, Host)
        assert host.reason.startswith("cannot train in ") and host.reason.count(". ") == 0  # one sentence
        with pytest.raises(TIError, match="cannot train in"):
            host.engine()
        assert host.loaded_embeddings() == {} and host.loaded_model() is None


def test_every_registered_adapter_implements_the_host_seam():
    import importlib

    for kind, name in registry.ADAPTERS.items():
        adapter = importlib.import_module(name).HOST
        assert isinstance(adapter, Host), kind
        assert adapter.reason == ""
