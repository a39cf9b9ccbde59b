"""The AUTOMATIC1111 webui's engine: the trainer's ``Engine`` on the ldm/sgm checkpoint the host has loaded.

Prompts go through the host's own hijacked text encoder with the trained vectors registered as a live
embedding, so training sees exactly the conditioning a txt2img generation builds (emphasis, 75-token
chunks, clip skip); the loss is ours, from ``alphas_cumprod`` and ``apply_model``. Imports the host
lazily, inside functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..engine import PreviewRequest, frozen_modules, max_row_norm
from ..errors import TIError
from ..families import FAMILIES
from ..formats.lora import UNET, kohya_name, matches, text_kohya_name
from ..splice import spread_init_vectors
from .gpu_queue import job_state_kept, quiet_total_progress


class WebuiEngine:
    """Implements ``lib_ti.engine.Engine`` on ``shared.sd_model``."""

    cpu_channels_last = True

    def __init__(self, sd_model) -> None:
        from modules import devices

        self.model = sd_model
        self.family = model_family(sd_model)
        if self.family not in FAMILIES:
            raise TIError(f"the loaded checkpoint is {self.family.upper()}: training inside the webui supports "
                          "SD1.x, SD2.x and SDXL checkpoints; load one of those")
        self.keys = FAMILIES[self.family].encoders  # in the order of the host's text embedders
        self.prediction_type = {"eps": "epsilon", "v": "v_prediction"}[sd_model.parameterization]
        self.device = devices.device
        self.embedders = dict(zip(self.keys, _text_embedders(sd_model), strict=True))
        with torch.no_grad():
            self.encoder_widths = {k: int(e.encode_embedding_init_text(",", 1).shape[1])
                                   for k, e in self.embedders.items()}
            self.token_norms = {k: max_row_norm(_token_table(e)) for k, e in self.embedders.items()}
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().float().to(self.device)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.checkpoint_name = getattr(info, "name_for_extra", "") or ""
        self.checkpoint_hash = getattr(info, "shorthash", "") or ""
        self.live = None  # the host Embedding whose .vec is the trained tensor during a run
        self.saved_flags: dict = {}  # SDXL: the UNet blocks' own checkpointing flags, put back after a run

    # ------------------------------------------------------------------ Engine surface
    def init_vectors(self, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
        """The host's own rule (textual_inversion.create_embedding): the first n init tokens, spread."""
        out = {}
        for key, embedder in self.embedders.items():
            width = self.encoder_widths[key]
            tokens = torch.zeros(0, width)
            if init_text:
                with torch.no_grad():
                    tokens = embedder.encode_embedding_init_text(init_text, num_vectors)
            out[key] = spread_init_vectors(tokens.detach().float().cpu(), num_vectors, width)
        return out

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from modules import devices

        mean, std = self._encode(pixels, devices.dtype_vae)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            mean, std = self._encode_fp32(pixels)  # a half-precision VAE can overflow; latents must never be NaN
        return mean, std

    def _encode(self, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = float(self.model.scale_factor)
        x = pixels.to(self.device, dtype)
        if self.family != "sdxl":
            dist = self.model.encode_first_stage(x)
            return dist.mean.float() * scale, dist.std.float() * scale
        # sgm's encode_first_stage returns one scaled sample; the cache keeps the distribution.
        vae = self.model.first_stage_model
        if getattr(self.model, "lowvram", False):
            vae.to(self.device)  # medvram: the host's hook would move it only for vae.encode
        mean, logvar = vae.quant_conv(vae.encoder(x)).float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean * scale, std * scale

    def _encode_fp32(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.first_stage_model
        dtype = next(vae.parameters()).dtype
        vae.to(torch.float32)
        try:
            with torch.autocast(self.device.type, enabled=False):
                mean, std = self._encode(pixels, torch.float32)
        finally:
            vae.to(dtype)
        if not torch.isfinite(mean).all():
            raise TIError("the VAE gives non-finite latents for this dataset even in float32: check the images "
                          "and the checkpoint's VAE")
        return mean, std

    def encode_prompts(self, prompts: list[str], token: str, vectors: dict[str, torch.Tensor], size):
        self.set_live(token, vectors)
        if self.family != "sdxl":
            return self.model.cond_stage_model(prompts)
        from modules.prompt_parser import SdConditioning

        # The host's own SDXL conditioning (crossattn + pooled vector with the size/crop embeddings), as
        # for a generation at this size; sgm runs non-trainable embedders under no_grad, hence the flag.
        batch = SdConditioning(prompts, width=size[1], height=size[0])
        with _text_embedders_trainable(self.model):
            return self.model.get_learned_conditioning(batch)

    def _host_vec(self, vectors: dict[str, torch.Tensor]):
        """The host splices ``vec`` (one tensor) or ``vec[key]`` (SDXL) into each text encoder."""
        return dict(vectors) if self.family == "sdxl" else vectors[self.keys[0]]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.apply_model(noisy_latents, timesteps, cond)

    def frozen(self):
        # No eval(): the host's modules stay in the mode the host keeps them in.
        return frozen_modules([self.model], eval_mode=False)

    def step_modules(self) -> list[torch.nn.Module]:
        return [self.model.model, self.model.cond_stage_model]  # the VAE (first_stage_model) is left as it is

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if self.family == "sdxl":
            # sgm's UNet config asks every block to checkpoint itself: ~45% slower, only worth it when
            # memory asks. The flags are put back in host_session.
            for module, attr in _sgm_checkpoint_flags(self.model):
                self.saved_flags.setdefault((module, attr), getattr(module, attr))
                setattr(module, attr, enabled)
            return
        from modules import sd_hijack_checkpoint

        if enabled:
            sd_hijack_checkpoint.add()
        else:
            sd_hijack_checkpoint.remove()

    def restore_checkpoint_flags(self) -> None:
        for (module, attr), value in self.saved_flags.items():
            setattr(module, attr, value)
        self.saved_flags.clear()

    @torch.no_grad()
    def render_preview(self, request: PreviewRequest, token: str, vectors: dict[str, torch.Tensor]):
        """A txt2img render through the host's own processing (sampler, CFG, seed), with the current vectors."""
        self.set_live(token, {k: v.detach() for k, v in vectors.items()})
        return render(self.model, request)

    def lora_modules(self, targets: list[str]) -> dict[str, torch.nn.Linear]:
        """The host's ldm/sgm modules are named as kohya names them: ``lora_unet_`` + their path."""
        unet_targets = [t for t in targets if t != "text"]
        found = {kohya_name(UNET, path): module for path, module in self.model.model.diffusion_model.named_modules()
                 if isinstance(module, torch.nn.Linear) and matches(unet_targets, path)}
        if "text" in targets:
            if self.family != "sd1":
                raise TIError("LoRA target 'text' works in the webui on SD1.x checkpoints only (the OpenCLIP encoders "
                              "of SD2 and SDXL keep q, k and v in one fused layer): leave 'text' out")
            encoder = self.embedders["clip_l"].wrapped.transformer  # transformers' CLIPTextModel
            found.update({text_kohya_name("lora_te", path): module for path, module in encoder.named_modules()
                          if isinstance(module, torch.nn.Linear) and matches(["text"], path)})
        return found

    # ------------------------------------------------------------------ the live embedding
    def set_live(self, token: str, vectors: dict[str, torch.Tensor]) -> None:
        live = self.live_embedding(token)
        live.vec = self._host_vec(vectors)
        # The host reserves ``vectors`` prompt tokens for an embedding and splices as many rows as the
        # tensor has: a smaller count would overwrite the tokens that follow the name.
        live.vectors = next(iter(vectors.values())).shape[0]

    def live_embedding(self, token: str):
        """Register (once per run) a host Embedding named ``token``; its ``vec`` is the trained tensor. Registered
        again when the host dropped it: its Textual Inversion cards' refresh reloads every embedding from disk."""
        if self.live is not None and self.live.name == token and not _registered(self.live, token):
            from modules import sd_hijack

            sd_hijack.model_hijack.embedding_db.register_embedding(self.live, self.model)
        if self.live is None or self.live.name != token:
            from modules import sd_hijack
            from modules.textual_inversion.textual_inversion import Embedding as HostEmbedding

            zeros = {k: torch.zeros(1, w, device=self.device) for k, w in self.encoder_widths.items()}
            live = HostEmbedding(self._host_vec(zeros), token)
            live.shape, live.vectors = sum(self.encoder_widths.values()), 1
            sd_hijack.model_hijack.embedding_db.register_embedding(live, self.model)
            self.live = live
        return self.live


@torch.no_grad()
def render(sd_model, request: PreviewRequest, scripts=None):
    """One image through the host's own txt2img processing, the training job's state kept around it.
    ``scripts``: a script runner for hosts whose processing reads one unconditionally (reForge)."""
    from modules import processing, shared

    reset_conditioning_cache()
    # scheduler "Automatic": the host's default, named, so that it logs no "autocorrection" per render.
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=request.prompt, negative_prompt=request.negative_prompt,
        steps=request.steps, sampler_name=request.sampler_name or "Euler", scheduler="Automatic",
        cfg_scale=request.cfg_scale, seed=request.seed, width=request.width, height=request.height,
        do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True)
    if scripts is not None:
        p.scripts, p.script_args = scripts, []
    with job_state_kept(shared.state), quiet_total_progress(shared), contextlib.closing(p):
        processed = processing.process_images(p)
    reset_conditioning_cache()
    if not processed.images:
        raise TIError("the render returned no image (interrupted?)")
    return processed.images[0]



def _registered(embedding, token: str) -> bool:
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db.word_embeddings.get(token) is embedding


# Where the host's embedders keep their token-embedding layer: CLIP (SD1, SDXL's clip_l), OpenCLIP (SD2,
# SDXL's clip_g), XLM-R (Alt Diffusion). The host's hijack wraps the layer; its own is ``.wrapped``.
_TOKEN_LAYERS = ("transformer.text_model.embeddings.token_embedding", "model.token_embedding",
                 "roberta.embeddings.token_embedding")
_SAMPLE_TEXT = "a photo of the person cat dog house city art painting red blue green"


def _token_table(embedder) -> torch.Tensor:
    """The token-embedding weight of a host text embedder; for one laid out otherwise, the embeddings of a
    sample of common words (what its own ``encode_embedding_init_text`` gives), a smaller sample of the table."""
    for path in _TOKEN_LAYERS:
        layer = getattr(embedder, "wrapped", None)
        for attr in path.split("."):
            layer = getattr(layer, attr, None)
        weight = getattr(getattr(layer, "wrapped", layer), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    return embedder.encode_embedding_init_text(_SAMPLE_TEXT, 75)


def _text_embedders(sd_model) -> list:
    if getattr(sd_model, "is_sdxl", False):
        return [e for e in sd_model.conditioner.embedders if hasattr(e, "encode_embedding_init_text")]
    return [sd_model.cond_stage_model]


@contextlib.contextmanager
def _text_embedders_trainable(sd_model) -> Iterator[None]:
    embedders = _text_embedders(sd_model)
    saved = [e.is_trainable for e in embedders]
    for e in embedders:
        e.is_trainable = True
    try:
        yield
    finally:
        for e, flag in zip(embedders, saved, strict=True):
            e.is_trainable = flag


def _sgm_checkpoint_flags(sd_model) -> list[tuple[object, str]]:
    flags = []
    for module in sd_model.model.diffusion_model.modules():
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(module, attr, None), bool):
                flags.append((module, attr))
    return flags


def model_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    return "unknown"



def reset_conditioning_cache() -> None:
    """The host caches prompt conditioning by prompt text, not by embedding contents (webui #11993):
    after the vectors change, a cached conditioning would render the old embedding."""
    from modules import processing

    # [params, conditioning] in A1111; Forge adds a third slot (the infotext its text engines wrote).
    for cls, attrs in ((processing.StableDiffusionProcessing, ("cached_c", "cached_uc")),
                       (processing.StableDiffusionProcessingTxt2Img, ("cached_hr_c", "cached_hr_uc"))):
        for attr in attrs:
            setattr(cls, attr, [None] * max(2, len(getattr(cls, attr, None) or ())))

