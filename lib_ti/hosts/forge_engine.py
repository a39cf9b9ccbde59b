"""Forge's engine (lllyasviel's "Forge2", Forge Neo): the trainer's ``Engine`` on the checkpoint Forge has loaded.

Forge has no ldm model shell: ``shared.sd_model`` is a ``ForgeDiffusionEngine`` holding ``forge_objects`` (a
UNet patcher around a ``KModel``, the CLIP patcher, the VAE) and one ``ClassicTextProcessingEngine`` per text
encoder. What this engine does differently from A1111's (``hosts.md`` §2.2 of the project's reference notes):

* Conditioning: Forge's own ``get_learned_conditioning`` body (chunks, emphasis, clip skip, SDXL's pooled vector
  and size embeddings) called through ``__wrapped__``, past its ``@torch.inference_mode`` decorator, so that the
  gradient reaches our vectors; they are spliced by each engine's ``CLIPEmbeddingForTextualInversion`` from a
  live embedding registered in that engine's database.
* Weights: Forge builds its models under ``inference_mode``, and autograd cannot save inference tensors for the
  backward pass. Before training, every such parameter and buffer of the UNet and text encoders is replaced by
  a normal tensor with the same bits (``autograd_safe``); Forge runs those under inference mode as before.
* The loss: ``KModel.apply_model`` takes k-diffusion sigmas and returns x0. ``predict`` feeds it the noisy
  latent at the timestep's sigma and turns its x0 back into the model's own parameterisation (eps or v): the
  map is exact, and the trainer's loss, Min-SNR weights and loss figures stay those of every other host.
* Memory: the UNet and text encoders are put on the device by ``backend.memory_management.load_models_gpu``,
  as Forge's sampler does, again before each step (a preview render may have moved them).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from ..engine import PreviewRequest, max_row_norm
from ..errors import TIError
from ..splice import spread_init_vectors
from .a1111_engine import render

FORGE_FAMILIES = {"sd1": ("text_processing_engine",), "sdxl": ("text_processing_engine_l", "text_processing_engine_g")}
ENGINE_KEYS = {"text_processing_engine": "clip_l", "text_processing_engine_l": "clip_l",
               "text_processing_engine_g": "clip_g"}
QUANTIZED = ("float8_e4m3fn", "float8_e5m2", "nf4", "fp4", "gguf")
# Activations kept for the backward pass: about this many times what Forge reserves for a sampling step.
TRAINING_MEMORY_FACTOR = 4


def forge_family(sd_model) -> str:
    """sd1 | sdxl | what Forge loaded instead (sd2, sd3, flux, ...: named for the refusal)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl" if hasattr(sd_model, "text_processing_engine_l") else "sdxl-refiner"
    for flag, family in (("is_sd1", "sd1"), ("is_sd2", "sd2"), ("is_sd3", "sd3")):
        if getattr(sd_model, flag, False):
            return family
    return type(sd_model).__name__


def refusal(sd_model) -> str | None:
    """Why training cannot work on this Forge model (one sentence), or None."""
    family = forge_family(sd_model)
    if family not in FORGE_FAMILIES:
        return (f"the loaded checkpoint is {family.upper() if family.islower() else family}: training in Forge "
                "supports SD1.x and SDXL checkpoints; load one of those")
    kmodel = _objects(sd_model).unet.model
    storage = str(getattr(kmodel, "storage_dtype", getattr(kmodel.diffusion_model, "storage_dtype", "")))
    if any(q in storage for q in QUANTIZED):
        return (f"the loaded UNet is stored as {storage.replace('torch.', '')}, which a backward pass cannot run "
                "through: set Diffusion in Low Bits to Automatic (or load an fp16/bf16/fp32 checkpoint) to train")
    kind = getattr(kmodel.predictor, "prediction_type", "")
    if kind not in ("epsilon", "v_prediction") or not hasattr(kmodel.predictor, "sigmas"):
        return (f"the loaded checkpoint predicts {kind or type(kmodel.predictor).__name__} (a flow or EDM model): "
                "training in Forge supports eps- and v-prediction SD1.x and SDXL checkpoints")
    return None


def _objects(sd_model):
    """The patchers without the prompt's LoRAs: Forge's ``forge_objects_original`` (LoRAs patch clones of it)."""
    return getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects


class ForgeEngine:
    """Implements ``lib_ti.engine.Engine`` on Forge's ``shared.sd_model``."""

    cpu_channels_last = False  # its weights are managed (and cast per call) by Forge; not measured there

    def __init__(self, sd_model) -> None:
        from backend import memory_management

        reason = refusal(sd_model)
        if reason:
            raise TIError(reason)
        self.model = sd_model
        self.family = forge_family(sd_model)
        objects = _objects(sd_model)
        self.unet, self.clip, self.vae = objects.unet, objects.clip, objects.vae
        self.kmodel = self.unet.model
        self.text_engines = {ENGINE_KEYS[attr]: getattr(sd_model, attr) for attr in FORGE_FAMILIES[self.family]}
        self.keys = list(self.text_engines)
        self.prediction_type = self.kmodel.predictor.prediction_type
        self.device = memory_management.get_torch_device()
        sigmas = self.kmodel.predictor.sigmas.detach().float().clone()
        self.sigmas = sigmas.to(self.device)
        self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).to(self.device)  # the predictor's own schedule
        tables = {k: token_table(e) for k, e in self.text_engines.items()}
        self.encoder_widths = {k: int(t.shape[1]) for k, t in tables.items()}
        self.token_norms = {k: max_row_norm(t) for k, t in tables.items()}
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.checkpoint_name = getattr(info, "name_for_extra", "") or ""
        self.checkpoint_hash = getattr(info, "shorthash", "") or ""
        self.live: Any = None  # the host Embedding whose .vec is the trained tensor during a run
        self.replaced = 0  # inference tensors of the host replaced by normal ones (self.prepare)
        self.hooks: list = []  # on the UNet's LayerNorms while a session lasts (_input_copied)

    # ------------------------------------------------------------------ weights on the device, usable by autograd
    def modules(self) -> list[torch.nn.Module]:
        return [self.kmodel, self.clip.cond_stage_model]

    def prepare(self, batch: int = 1, size: tuple[int, int] = (512, 512)) -> None:
        """UNet and text encoders loaded by Forge's memory manager, their weights usable in a backward pass."""
        from backend import memory_management

        shape = [TRAINING_MEMORY_FACTOR * batch, 4, size[0] // 8, size[1] // 8]
        memory_management.load_models_gpu([self.unet, self.clip.patcher],
                                          memory_required=self.kmodel.memory_required(shape))
        self.replaced += autograd_safe(self.modules())
        if not self.hooks:
            self.hooks = [m.register_forward_pre_hook(_input_copied) for m in self.kmodel.modules()
                          if isinstance(m, torch.nn.LayerNorm)]

    def release(self) -> None:
        """Take the hooks ``prepare`` and the checkpointing added off the host's UNet (end of a session)."""
        self.set_gradient_checkpointing(False)
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    # ------------------------------------------------------------------ Engine surface
    def init_vectors(self, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
        """The first n init tokens' embeddings, spread over the vectors (A1111's rule; Forge has none of its own)."""
        out = {}
        for key, engine in self.text_engines.items():
            ids = engine.tokenizer(init_text, add_special_tokens=False)["input_ids"][:num_vectors] if init_text else []
            with torch.no_grad():
                rows = token_table(engine)[torch.tensor(ids, dtype=torch.long)].float().cpu()
            out[key] = spread_init_vectors(rows, num_vectors, self.encoder_widths[key])
        return out

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent distribution (mean, std) as Forge's ``process_in`` scales it; Forge's ``encode`` samples."""
        from backend import memory_management

        vae = self.vae
        memory_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(
            pixels.movedim(1, -1).shape, vae.vae_dtype))
        for dtype in (vae.vae_dtype, torch.float32):  # a half-precision VAE can overflow: then in float32
            mean, std = self._encode(pixels, dtype)
            if torch.isfinite(mean).all() and torch.isfinite(std).all():
                return mean, std
        raise TIError("the VAE gives non-finite latents for this dataset even in float32: check the images and "
                      "the checkpoint's VAE")

    def _encode(self, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.vae.first_stage_model
        weights = next(net.parameters()).dtype
        net.to(dtype)
        try:
            z = net.encoder(pixels.to(self.vae.device, dtype))
            if net.quant_conv is not None:
                z = net.quant_conv(z)
        finally:
            net.to(weights)
        mean, logvar = z.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean - net.shift_factor) * net.scaling_factor, std * net.scaling_factor

    def encode_prompts(self, prompts: list[str], token: str, vectors: dict[str, torch.Tensor], size):
        self.prepare(len(prompts), size)
        self.set_live(token, vectors)
        return conditioning(self.model, prompts, size, with_grad=True)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """eps or v from Forge's predictor: x_t = sqrt(a) x0 + sqrt(1-a) eps is x0 + sigma eps scaled by sqrt(a)."""
        shape = (-1,) + (1,) * (noisy_latents.ndim - 1)
        sigma = self.sigmas[timesteps]
        a = self.alphas_cumprod[timesteps].view(shape)
        x = noisy_latents / a.sqrt()
        extra = {"c_crossattn": cond["crossattn"], "y": cond["vector"]} if isinstance(cond, dict) else \
            {"c_crossattn": cond}
        x0 = self.kmodel.apply_model(x, sigma, **extra)
        eps = (x - x0) / sigma.view(shape)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No host weight requires grad inside (made autograd-safe first); each flag is put back afterwards on
        the tensor then in its place (a preview render may have moved it), where torch allows it."""
        self.prepare()
        modules = [*self.modules(), self.vae.first_stage_model]
        flags = [(sub, name, p.requires_grad) for m in modules for sub in m.modules()
                 for name, p in sub._parameters.items() if p is not None]
        for sub, name, _ in flags:
            sub._parameters[name].requires_grad_(False)
        try:
            yield
        finally:
            for sub, name, flag in flags:
                param = sub._parameters[name]
                if flag and not _is_inference(param):  # torch refuses requires_grad on inference tensors
                    param.requires_grad_(True)

    def step_modules(self) -> list[torch.nn.Module]:
        return self.modules()  # the VAE only caches latents

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Forge's UNet has no checkpointing of its own: each of its input, middle and output blocks is run through
        torch's (non-reentrant) checkpoint while enabled. Worth it where Forge stores the weights in another dtype
        than it computes in (bf16 on a CPU): the cast copies would otherwise be kept for the backward pass."""
        blocks = [*getattr(self.kmodel.diffusion_model, "input_blocks", []),
                  getattr(self.kmodel.diffusion_model, "middle_block", None),
                  *getattr(self.kmodel.diffusion_model, "output_blocks", [])]
        for block in blocks:
            if block is None:
                continue
            if enabled and "forward" not in block.__dict__:
                block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))
            elif not enabled:
                block.__dict__.pop("forward", None)

    @torch.no_grad()
    def render_preview(self, request: PreviewRequest, token: str, vectors: dict[str, torch.Tensor]):
        """A txt2img render through Forge's own processing, with the current vectors."""
        self.set_live(token, {k: v.detach() for k, v in vectors.items()})
        return render(self.model, request)

    def lora_modules(self, targets: list[str]) -> dict[str, torch.nn.Linear]:
        raise TIError("mode pivotal (embedding + LoRA) is not available in Forge yet: train mode ti here, or "
                      "train pivotal in AUTOMATIC1111 or headless (python -m lib_ti)")

    # ------------------------------------------------------------------ the live embedding
    def set_live(self, token: str, vectors: dict[str, torch.Tensor]) -> None:
        """Every text engine's database resolves ``token`` to one live Embedding whose ``vec`` is the trained
        tensor (SD1: the clip_l tensor; SDXL: the {clip_l, clip_g} dict each engine takes its key from)."""
        if self.live is None or self.live.name != token:
            from backend.text_processing.textual_inversion import Embedding as HostEmbedding

            self.live = HostEmbedding(None, token)
        self.live.vec = dict(vectors) if self.family == "sdxl" else vectors["clip_l"]
        self.live.vectors = next(iter(vectors.values())).shape[0]  # prompt tokens reserved for the name
        self.live.shape = sum(self.encoder_widths.values())
        for engine in self.text_engines.values():
            if engine.embeddings.word_embeddings.get(token) is not self.live:
                engine.embeddings.register_embedding_by_name(self.live, token)

    def databases(self) -> list:
        return [engine.embeddings for engine in self.text_engines.values()]


def conditioning(sd_model, prompts: list[str], size: tuple[int, int], *, with_grad: bool):
    """Forge's generation conditioning for ``prompts`` at ``size`` (its clip skip setting applied, as processing
    does); ``with_grad``: the same body run outside its inference-mode decorator."""
    from backend.text_processing import classic_engine
    from modules import shared
    from modules.prompt_parser import SdConditioning

    sd_model.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
    batch = SdConditioning(prompts, width=size[1], height=size[0])
    body = getattr(type(sd_model).get_learned_conditioning, "__wrapped__", None)
    if body is None:
        raise TIError(f"this Forge's {type(sd_model).__name__}.get_learned_conditioning is not the inference-mode "
                      "wrapped function the extension knows, so no gradient can reach the embedding: please report "
                      "your Forge version")
    # The text engines note the embeddings they used ("TI: name") for the next generation's infotext: ours are not.
    notes = dict(classic_engine.last_extra_generation_params)
    try:
        if not with_grad:
            return sd_model.get_learned_conditioning(batch)
        with torch.inference_mode(False):
            return body(sd_model, batch)
    finally:
        classic_engine.last_extra_generation_params.clear()
        classic_engine.last_extra_generation_params.update(notes)


def token_table(engine) -> torch.Tensor:
    """A text engine's token-embedding weight (Forge wraps the layer in CLIPEmbeddingForTextualInversion)."""
    layer = engine.text_encoder.transformer.text_model.embeddings.token_embedding
    return getattr(layer, "wrapped", layer).weight


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _input_copied(_module, args):
    """Forge's transformer blocks add in place to the tensor their LayerNorm just read (``x += attn(norm1(x))``),
    which autograd refuses (the norm saved it for the backward pass): with grad on, the norm reads a copy."""
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


def _is_inference(t: torch.Tensor) -> bool:
    """An inference tensor, or a parameter whose data was swapped under inference mode (no version counter)."""
    try:
        _ = t._version
    except RuntimeError:
        return True
    return t.is_inference()


def autograd_safe(modules: list[torch.nn.Module]) -> int:
    """Replace every inference-mode parameter and buffer of ``modules`` by a normal tensor with the same bits (one
    at a time: memory grows by one tensor); shared tensors stay shared. Returns how many were replaced."""
    memo: dict[int, torch.Tensor] = {}
    for module in modules:
        for sub in module.modules():
            tables: tuple[dict, dict] = (sub._parameters, sub._buffers)
            for table in tables:
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in memo:
                        memo[id(t)] = _normal(t) if _is_inference(t) else t
                    table[name] = memo[id(t)]
    return sum(new is not None and id(new) != old for old, new in memo.items())


def _normal(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):
        copy = t.detach().clone()
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=t.requires_grad)
    return copy
