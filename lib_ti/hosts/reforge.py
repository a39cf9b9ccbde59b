"""reForge (Panchovix) as a training host: A1111's model shell with a Forge (ldm_patched) UNet, VAE and CLIP.

reForge keeps A1111's ``sd_model`` (``cond_stage_model``, ``apply_model``, ``alphas_cumprod``), its hijacked
text encoders and its global embedding database, so the A1111 adapter serves it, except where the Forge
parts show through (hosts.md §2.3):

* the UNet, VAE and CLIP weights belong to ``ldm_patched.modules.model_management``: it moves them to the
  GPU (and applies LoRA weight patches) only for the patcher it is asked to load. A run asks for the
  checkpoint's own patchers (``forge_objects_original``: no prompt LoRA baked in) before each step; what
  it loaded stays in the manager's list, where the next generation finds and swaps it as usual.
* ``encode_first_stage`` is an ``inference_mode`` closure returning one sample: the latent cache needs the
  distribution as ordinary tensors, so the VAE's encoder runs here, under ``no_grad``.
* its txt2img processing reads ``p.scripts.alwayson_scripts`` whether or not scripts were given: renders
  get an empty script runner (no extension's script runs on a preview, as in A1111).
* the UNet is ldm_patched's: called as its ``BaseModel`` calls it (inputs cast to its compute dtype),
  with discrete timesteps, so the loss stays ours (eps or v from ``alphas_cumprod``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..engine import PreviewRequest
from ..errors import TIError
from .a1111 import A1111Host
from .a1111_engine import WebuiEngine, render
from .host import Host


class ReforgeEngine(WebuiEngine):
    """``WebuiEngine`` with the Forge parts of reForge's model loaded and called the way its manager expects."""

    cpu_channels_last = False  # its ldm_patched ops cast weights per call; the layout change is not measured there

    def __init__(self, sd_model) -> None:
        super().__init__(sd_model)
        objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects
        self.objects = objects.shallow_copy() if hasattr(objects, "shallow_copy") else objects

    @contextlib.contextmanager
    def checkpoint_loaded(self) -> Iterator[None]:
        """The checkpoint's own UNet and CLIP loaded by the host's manager; the host's text encoders (which
        load ``sd_model.forge_objects.clip`` themselves) see the same objects while they run."""
        from ldm_patched.modules import model_management

        model_management.load_models_gpu([self.objects.unet, self.objects.clip.patcher])
        current = self.model.forge_objects
        self.model.forge_objects = self.objects
        try:
            yield
        finally:
            self.model.forge_objects = current

    def encode_prompts(self, prompts: list[str], token: str, vectors: dict[str, torch.Tensor], size):
        with self.checkpoint_loaded():
            return super().encode_prompts(prompts, token, vectors, size)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        base = self.objects.unet.model  # ldm_patched BaseModel: its _apply_model, without the sigma wrapping
        dtype = base.manual_cast_dtype or base.get_dtype()
        context, extra = (cond["crossattn"], {"y": cond["vector"].to(dtype)}) if isinstance(cond, dict) else (cond, {})
        out = base.diffusion_model(noisy_latents.to(dtype), timesteps.float(), context=context.to(dtype), **extra)
        return out.float()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._encode(pixels, self.objects.vae.vae_dtype)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            mean, std = self._encode_fp32(pixels)  # a half-precision VAE can overflow; latents must never be NaN
        return mean, std

    def _encode(self, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        from ldm_patched.modules import model_management

        vae = self.objects.vae
        model_management.load_models_gpu([vae.patcher])
        autoencoder = vae.first_stage_model
        moments = autoencoder.encoder(pixels.to(vae.device, dtype))
        if getattr(autoencoder, "quant_conv", None) is not None:
            moments = autoencoder.quant_conv(moments)
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latent_format = self.objects.unet.model.model_config.latent_format  # what the host's encode_first_stage applies
        return latent_format.process_in(mean).to(self.device), (std * latent_format.scale_factor).to(self.device)

    @torch.no_grad()
    def render_preview(self, request: PreviewRequest, token: str, vectors: dict[str, torch.Tensor]):
        self.set_live(token, {k: v.detach() for k, v in vectors.items()})
        return render(self.model, request, scripts=no_scripts())

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            raise TIError("gradient_checkpointing=True has no effect in reForge (its UNet is ldm_patched's, which "
                          "A1111's checkpointing patch does not reach): set gradient_checkpointing to False")
        super().set_gradient_checkpointing(False)


class ReforgeHost(A1111Host):
    """A1111's adapter (embedding database, putting the host back, renders, self-check) with reForge's engine."""

    name = "reForge"
    engine_type = ReforgeEngine

    def txt2img(self, request: PreviewRequest):
        from modules import shared

        if shared.sd_model is None:
            raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page")
        return render(shared.sd_model, request, scripts=no_scripts())


def no_scripts():
    """An empty script runner: what reForge's processing reads of ``p.scripts`` with nothing in it."""
    from modules import scripts

    return scripts.ScriptRunner()


HOST: Host = ReforgeHost()
