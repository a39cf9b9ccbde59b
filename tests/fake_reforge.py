"""reForge's surface on top of the fake A1111 host (tests/fake_webui.py), for the fake-host tier.

reForge keeps A1111's model shell and global embedding database (the fake_webui parts) and puts Forge
(ldm_patched) parts under it; what ``lib_ti/hosts/reforge.py`` relies on of those is faked here with the
tiny SD1 model's real modules (v3b56b268 names, hosts.md §2.3):

* ``sd_model.forge_objects`` / ``forge_objects_original``: the UNet patcher (``.model`` a BaseModel
  with ``diffusion_model`` called ldm-style, ``manual_cast_dtype``, ``model_config.latent_format``), the CLIP
  (``.patcher``) and the VAE (``first_stage_model`` with ``encoder``/``quant_conv``, ``vae_dtype``, ``device``);
  the host's current objects are clones of the checkpoint's, as after a generation with a LoRA;
* ``ldm_patched.modules.model_management.load_models_gpu``, recording what it was asked to load;
* the host's text encoder loads ``sd_model.forge_objects.clip.patcher`` itself (``forge_clip.move_clip_to_gpu``);
* ``encode_first_stage`` is an ``inference_mode`` closure returning one scaled sample (``forge_loader``);
* txt2img processing reads ``p.scripts.alwayson_scripts`` unconditionally (``processing.py:1065``).

Whether real reForge behaves like this is tests/test_reforge_real.py's question, not this one's.
"""

from __future__ import annotations

import sys
import types

import fake_webui
import torch


class LdmUnet(torch.nn.Module):
    """ldm_patched's UNetModel call, ``(x, timesteps, context=, y=)``, over the tiny diffusers UNet."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet
        self.dtype = torch.float32

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None):
        assert y is None, "SD1 has no vector conditioning"
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


class LatentFormat:
    def __init__(self, scale_factor: float) -> None:
        self.scale_factor = scale_factor

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale_factor


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model: LdmUnet, latent_format: LatentFormat) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.manual_cast_dtype = None
        self.model_config = types.SimpleNamespace(latent_format=latent_format)

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype


class Patcher:
    """A ModelPatcher: a handle on a shared model; a LoRA'd clone is another handle on the same model."""

    def __init__(self, model, label: str) -> None:
        self.model, self.label = model, label

    def clone(self, label: str) -> Patcher:
        return Patcher(self.model, label)


class ForgeObjects:
    def __init__(self, unet, clip, vae) -> None:
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet, self.clip, self.vae)


class ModelManagement:
    def __init__(self) -> None:
        self.loaded: list[list[str]] = []  # each call's patchers, by label

    def load_models_gpu(self, models, memory_required=0, **kwargs) -> None:
        self.loaded.append([m.label for m in models])

    def load_model_gpu(self, model) -> None:
        self.load_models_gpu([model])


class ReforgeEmbedder(fake_webui.FakeEmbedder):
    """forge_clip.CLIP_SD_15_L: loads whatever ``sd_model.forge_objects.clip`` is before it encodes."""

    def __init__(self, text_model, tokenizer, db, sd_model, manager: ModelManagement) -> None:
        super().__init__(text_model, tokenizer, db)
        self.host = [sd_model]  # a list: not registered as a submodule (the model holds this embedder)
        self.manager = manager
        self.clips_seen: list[str] = []

    def encode(self, prompts: list[str]):
        clip = self.host[0].forge_objects.clip.patcher
        self.manager.load_model_gpu(clip)
        self.clips_seen.append(clip.label)
        return super().encode(prompts)


def install(monkeypatch, root, engine) -> types.SimpleNamespace:
    """fake_webui's A1111 host with reForge's Forge parts under its model; SD1 (the tiny model)."""
    assert engine.family == "sd1", "the fake reForge is SD1 only"
    fake = fake_webui.install(monkeypatch, root, engine)
    model, manager = fake.sd_model, ModelManagement()
    unet = LdmUnet(engine.unet)
    model.model.diffusion_model = unet
    monkeypatch.setattr(model, "apply_model", lambda x, t, cond: unet(x, t, context=cond), raising=False)
    encoder = engine.encoders[0]
    model.cond_stage_model = ReforgeEmbedder(encoder.model, encoder.tokenizer, fake.db, model, manager)
    latent_format = LatentFormat(float(model.scale_factor))
    vae = types.SimpleNamespace(first_stage_model=model.first_stage_model, vae_dtype=torch.float32,
                                device=torch.device("cpu"), patcher=Patcher(model.first_stage_model, "vae"))
    original = ForgeObjects(Patcher(BaseModel(unet, latent_format), "unet"),
                            types.SimpleNamespace(patcher=Patcher(encoder.model, "clip")), vae)
    lora = ForgeObjects(original.unet.clone("unet+lora"),
                        types.SimpleNamespace(patcher=original.clip.patcher.clone("clip+lora")), vae)
    model.forge_objects_original, model.forge_objects = original, lora

    @torch.inference_mode()
    def encode_first_stage(x):  # forge_loader's closure: one latent (the VAE's mode), scaled, an inference tensor
        return latent_format.process_in(model.first_stage_model.encode(x).latent_dist.mode())

    model.encode_first_stage = encode_first_stage
    processing = fake.modules["modules.processing"]
    plain = processing.process_images

    def process_images(p):
        p.scripts.alwayson_scripts  # noqa: B018 - reForge reads it with no None check
        return plain(p)

    monkeypatch.setattr(processing, "process_images", process_images)
    script_runners: list[object] = []

    class ScriptRunner:
        def __init__(self) -> None:
            self.alwayson_scripts: list = []
            script_runners.append(self)

    parts = {
        "modules.scripts": fake_webui.module("modules.scripts", ScriptRunner=ScriptRunner),
        "ldm_patched": fake_webui.module("ldm_patched", __path__=[]),
        "ldm_patched.modules": fake_webui.module("ldm_patched.modules", __path__=[]),
        "ldm_patched.modules.model_management": fake_webui.module(
            "ldm_patched.modules.model_management", load_models_gpu=manager.load_models_gpu,
            load_model_gpu=manager.load_model_gpu),
    }
    for name, mod in parts.items():
        monkeypatch.setitem(sys.modules, name, mod)
    parts["ldm_patched.modules"].model_management = parts["ldm_patched.modules.model_management"]
    fake.modules.update(parts)
    fake.manager, fake.original, fake.lora, fake.script_runners = manager, original, lora, script_runners
    return fake
