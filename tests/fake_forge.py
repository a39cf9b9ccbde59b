"""A fake Forge ("Forge2") around the tiny real SD1 model, for the fake-host tier of the Forge adapter.

What it fakes is Forge's *surface* as ``lib_ti/hosts/forge*.py`` uses it (revision dfdcbab6): a
``ForgeDiffusionEngine``-shaped ``shared.sd_model`` (``forge_objects`` with a UNet patcher around a KModel that
takes sigmas and returns x0, the CLIP and VAE patchers; ``text_processing_engine`` with its own embedding
database; ``cond_stage_model = None``; an inference-mode ``get_learned_conditioning``), ``backend.memory_management``,
the cards' database, and ``modules.*`` from ``fake_webui`` with no ``model_hijack.embedding_db``. The weights are
copied under ``torch.inference_mode`` as Forge's loader builds them, so the adapter's autograd-safe copies are
exercised. Whether real Forge behaves like this is the real-host tier's question (tests/test_forge_real.py).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import fake_webui
import torch
from PIL import Image

from lib_ti.splice import layout_prompts, name_pattern, spliced


class EmbeddingDatabase:
    """backend.text_processing.textual_inversion.EmbeddingDatabase: by name, with the engine's expected width."""

    def __init__(self, expected_shape: int) -> None:
        self.word_embeddings: dict[str, object] = {}
        self.expected_shape = expected_shape

    def register_embedding(self, embedding):
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding, name: str):
        if embedding is None:
            self.word_embeddings.pop(name, None)
        else:
            self.word_embeddings[name] = embedding
        return embedding


class HostEmbedding:
    """backend.text_processing.textual_inversion.Embedding: vec, name, and the shape and vector count set later."""

    def __init__(self, vec, name: str, step=None) -> None:
        self.vec, self.name, self.step = vec, name, step
        self.shape, self.vectors, self.filename = None, 0, None


class CardsDatabase:
    """modules.textual_inversion's database as Forge keeps it for the cards: filled from files only."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_from_file(self, path: str, filename: str) -> None:
        self.loaded.append(filename)


class TextEngine:
    """ClassicTextProcessingEngine: prompts -> context, the database's embeddings spliced in by name."""

    def __init__(self, text_model, tokenizer, key: str = "clip_l") -> None:
        width = text_model.get_input_embeddings().weight.shape[1]
        self.embeddings = EmbeddingDatabase(width)
        self.tokenizer, self.key, self.model = tokenizer, key, text_model
        layer = types.SimpleNamespace(wrapped=text_model.get_input_embeddings())
        self.text_encoder = types.SimpleNamespace(transformer=types.SimpleNamespace(
            text_model=types.SimpleNamespace(embeddings=types.SimpleNamespace(token_embedding=layer))))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        from backend.text_processing import classic_engine

        words = self.embeddings.word_embeddings
        emb = next((e for name, e in sorted(words.items(), key=lambda kv: -len(kv[0]))
                    if any(name_pattern(name).search(p) for p in prompts)), None)
        if emb is None:
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            return self.model(ids).last_hidden_state
        classic_engine.last_extra_generation_params["TI"] = emb.name
        vec = emb.vec[self.key] if isinstance(emb.vec, dict) else emb.vec
        layout = layout_prompts(self.tokenizer, prompts, emb.name, vec.shape[0], self.tokenizer.model_max_length)
        with spliced(self.model.get_input_embeddings(), layout, vec):
            return self.model(layout.ids).last_hidden_state


class Predictor(torch.nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.log()[None] - self.sigmas.log()[:, None]).abs().argmin(dim=0)


class KModel(torch.nn.Module):
    """backend.modules.k_model.KModel: ``apply_model(x, sigma, c_crossattn)`` -> the denoised x0."""

    storage_dtype = torch.float32

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.diffusion_model, self.predictor = unet, Predictor(alphas_cumprod, prediction_type)

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t.view(-1, 1, 1, 1)
        out = self.diffusion_model(x / (sigma ** 2 + 1).sqrt(), self.predictor.timestep(t),
                                   encoder_hidden_states=c_crossattn).sample
        return x - out * sigma

    def memory_required(self, shape) -> int:
        return 1


class FakeVae(torch.nn.Module):
    """backend.nn.vae's AutoencoderKL surface: encoder, quant_conv, scaling and shift factors."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.scaling_factor, self.shift_factor = vae.config.scaling_factor, 0.0


class ForgeSD15:
    """modules' view of Forge's StableDiffusion engine (backend/diffusion_engine/sd15.py)."""

    is_sd1, is_sd2, is_sdxl, is_sd3 = True, False, False, False
    cond_stage_model = first_stage_model = None

    def __init__(self, engine, loads: list) -> None:
        with torch.inference_mode():  # Forge's loader runs under inference mode: so are its weights
            unet, vae = copy.deepcopy(engine.unet), copy.deepcopy(engine.vae)
            text_model = copy.deepcopy(engine.encoders[0].model)
        kmodel = KModel(unet, engine.alphas_cumprod.cpu())
        patcher = lambda model: types.SimpleNamespace(model=model, name=type(model).__name__)  # noqa: E731
        clip = types.SimpleNamespace(cond_stage_model=text_model, patcher=patcher(text_model))
        fvae = types.SimpleNamespace(first_stage_model=FakeVae(vae), patcher=patcher(vae), vae_dtype=torch.float32,
                                     device=torch.device("cpu"), memory_used_encode=lambda shape, dtype: 1)
        self.forge_objects = self.forge_objects_original = types.SimpleNamespace(
            unet=types.SimpleNamespace(model=kmodel, name="KModel"), clip=clip, vae=fvae)
        self.text_processing_engine = TextEngine(text_model, engine.encoders[0].tokenizer)
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-sd1.safetensors", name_for_extra="tiny-sd1",
                                                        shorthash="0123456789")
        self.clip_skip = 1

    def set_clip_skip(self, clip_skip: int) -> None:
        self.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        return self.text_processing_engine(list(prompt))


def process_images(p) -> types.SimpleNamespace:
    """One image whose colour is a function of Forge's conditioning of the prompt: the registered vectors show."""
    cond = p.sd_model.get_learned_conditioning([p.prompt])
    shade = int(abs(float(cond.mean())) * 1e4) % 256
    return types.SimpleNamespace(images=[Image.new("RGB", (p.width, p.height), (shade, 0, 0))])


def install(monkeypatch, root: Path, engine) -> types.SimpleNamespace:
    """fake_webui's ``modules`` turned into Forge's: its model, no global embedding database, ``backend``."""
    fake = fake_webui.install(monkeypatch, root, engine)
    loads: list[list[str]] = []
    sd_model = ForgeSD15(engine, loads)
    fake.shared.sd_model = sd_model
    fake.modules["modules.sd_models"].model_data.sd_model = sd_model
    fake.shared.opts.CLIP_stop_at_last_layers = 1
    fake.modules["modules.processing"].process_images = process_images
    for cls in (fake.modules["modules.processing"].StableDiffusionProcessing,):
        monkeypatch.setattr(cls, "cached_c", ["cached", "cached", "notes"])  # Forge's caches have three slots
    monkeypatch.setitem(sys.modules, "modules.sd_hijack", fake_webui.module("modules.sd_hijack",
                                                                            model_hijack=types.SimpleNamespace()))
    cards = CardsDatabase()
    monkeypatch.setitem(sys.modules, "modules.ui_extra_networks_textual_inversion",
                        fake_webui.module("modules.ui_extra_networks_textual_inversion", embedding_db=cards))
    memory = fake_webui.module(
        "backend.memory_management", get_torch_device=lambda: torch.device("cpu"),
        load_models_gpu=lambda models, memory_required=0: loads.append([m.name for m in models]),
        soft_empty_cache=lambda: loads.append(["emptied"]))
    parts = {
        "backend": fake_webui.module("backend", __path__=[]),
        "backend.memory_management": memory,
        "backend.text_processing": fake_webui.module("backend.text_processing", __path__=[]),
        "backend.text_processing.classic_engine": fake_webui.module("backend.text_processing.classic_engine",
                                                                    last_extra_generation_params={}),
        "backend.text_processing.textual_inversion": fake_webui.module(
            "backend.text_processing.textual_inversion", Embedding=HostEmbedding,
            create_embedding_from_data=fake_webui.create_embedding_from_data),
    }
    parts["backend"].memory_management = memory
    parts["backend"].text_processing = parts["backend.text_processing"]
    parts["backend.text_processing"].classic_engine = parts["backend.text_processing.classic_engine"]
    parts["backend.text_processing"].textual_inversion = parts["backend.text_processing.textual_inversion"]
    for name, mod in parts.items():
        monkeypatch.setitem(sys.modules, name, mod)
    fake.sd_model, fake.cards, fake.loads = sd_model, cards, loads
    fake.db = sd_model.text_processing_engine.embeddings
    fake.notes = parts["backend.text_processing.classic_engine"].last_extra_generation_params
    return fake
