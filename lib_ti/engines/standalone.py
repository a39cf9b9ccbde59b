"""The headless engine: a Stable Diffusion model loaded with diffusers + transformers.

Loads a diffusers folder, or a single-file checkpoint (``.safetensors``/``.ckpt``) with the
component configs taken from a local diffusers folder: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..devices import weights_dtype
from ..engine import PreviewRequest, frozen_modules, max_row_norm
from ..errors import TIError, say
from ..families import encoder_key
from ..formats.lora import TEXT_PREFIXES, matches, text_kohya_name, unet_kohya_name
from ..libraries import quiet_libraries
from ..splice import layout_prompts, spliced, spread_init_vectors


@dataclass
class TextEncoder:
    key: str  # clip_l / clip_h / clip_g
    model: Any  # transformers CLIPTextModel or CLIPTextModelWithProjection
    tokenizer: Any


@dataclass
class Conditioning:
    hidden: torch.Tensor  # [B, 77, cross_attention_dim]
    pooled: torch.Tensor | None = None  # SDXL only
    time_ids: torch.Tensor | None = None  # SDXL only


class StandaloneEngine:
    """Implements ``lib_ti.engine.Engine`` on diffusers components."""

    cpu_channels_last = True

    def __init__(self, unet, vae, encoders: list[TextEncoder], scheduler_config: dict, *, family: str,
                 device: torch.device, checkpoint_name: str, checkpoint_hash: str = "") -> None:
        self.unet, self.vae, self.encoders = unet, vae, encoders
        self.scheduler_config = dict(scheduler_config)
        self.family = family
        self.device = torch.device(device)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.encoder_widths = {e.key: e.model.get_input_embeddings().embedding_dim for e in encoders}
        self.token_norms = {e.key: max_row_norm(e.model.get_input_embeddings().weight) for e in encoders}
        self.alphas_cumprod = _alphas_cumprod(self.scheduler_config).to(self.device)
        self.checkpoint_name, self.checkpoint_hash = checkpoint_name, checkpoint_hash

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             config_dir: str | Path | None = None) -> StandaloneEngine:
        """Load a diffusers folder, or a single file whose component configs come from ``config_dir``."""
        path = Path(path)
        quiet_libraries()
        if not path.exists():
            raise TIError(f"model {str(path)!r} does not exist: give a diffusers folder or a .safetensors/.ckpt file")
        if not path.is_dir() and path.suffix not in (".safetensors", ".ckpt"):
            raise TIError(f"model {str(path)!r}: expected a diffusers folder or a .safetensors/.ckpt file")
        try:
            parts = _load_folder(path, dtype) if path.is_dir() else _load_single_file(path, dtype, config_dir)
        except (TIError, MemoryError):
            raise
        except Exception as exc:  # the libraries' many ways of saying "this file is not what it should be"
            raise TIError(f"model {str(path)!r} could not be loaded ({_first_line(exc)}): a file of it is damaged, "
                          "incomplete or not a Stable Diffusion model; download or convert it again") from exc
        unet, vae, encoders, sched, family = parts
        # The VAE stays float32: it only caches latents and decodes previews, and SDXL's VAE overflows in fp16.
        vae.to(device=device)
        unet.to(device=device)
        for enc in encoders:
            enc.model.to(device=device)
        return cls(unet, vae, encoders, sched, family=family, device=torch.device(device),
                   checkpoint_name=path.stem if path.is_file() else path.name, checkpoint_hash=_short_hash(path))

    # ------------------------------------------------------------------ Engine surface
    def init_vectors(self, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
        out = {}
        for enc in self.encoders:
            ids = enc.tokenizer(init_text, add_special_tokens=False).input_ids if init_text else []
            table = enc.model.get_input_embeddings().weight
            vecs = table[torch.tensor(ids, dtype=torch.long, device=table.device)].detach().cpu()
            out[enc.key] = spread_init_vectors(vecs, num_vectors, table.shape[1])
        return out

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        scale = self.vae.config.scaling_factor
        return dist.mean.float() * scale, dist.std.float() * scale

    def encode_prompts(self, prompts: list[str], token: str, vectors: dict[str, torch.Tensor],
                       size: tuple[int, int]) -> Conditioning:
        if set(vectors) != set(self.encoder_widths):
            raise TIError(
                f"vectors for {sorted(vectors)} given, this model's encoders are {sorted(self.encoder_widths)}; "
                "match the embedding to the model first (embedding.match_to_model)"
            )
        states, pooled = [], None
        for enc in self.encoders:
            vec = vectors[enc.key]
            layout = layout_prompts(enc.tokenizer, prompts, token, vec.shape[0], enc.tokenizer.model_max_length)
            with spliced(enc.model.get_input_embeddings(), layout, vec):
                out = enc.model(layout.ids.to(self.device), output_hidden_states=self.family == "sdxl")
            if self.family == "sdxl":
                states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
                pooled = getattr(out, "text_embeds", pooled)
            else:
                states.append(out.last_hidden_state)
        cond = Conditioning(torch.cat(states, dim=-1))
        if self.family == "sdxl":
            h, w = size  # no crop and no resize in the cached latents: original = target size, crop (0, 0)
            cond.pooled = pooled
            cond.time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device).repeat(len(prompts), 1)
        return cond

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.unet.dtype
        extra = {}
        if cond.pooled is not None and cond.time_ids is not None:
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        return self.unet(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype), **extra
        ).sample

    def frozen(self):
        return frozen_modules([self.unet, self.vae, *(e.model for e in self.encoders)], eval_mode=True)

    def step_modules(self) -> list[torch.nn.Module]:
        return [self.unet, *(e.model for e in self.encoders)]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def lora_modules(self, targets: list[str]) -> dict[str, torch.nn.Linear]:
        unet_targets = [t for t in targets if t != "text"]
        found = {unet_kohya_name(path, self.unet.config): module for path, module in self.unet.named_modules()
                 if isinstance(module, torch.nn.Linear) and matches(unet_targets, path)}
        if "text" in targets:
            for prefix, enc in zip(TEXT_PREFIXES[self.family], self.encoders, strict=True):
                found.update({text_kohya_name(prefix, path): module for path, module in enc.model.named_modules()
                              if isinstance(module, torch.nn.Linear) and matches(["text"], path)})
        return found

    @torch.no_grad()
    def render_preview(self, request: PreviewRequest, token: str, vectors: dict[str, torch.Tensor]):
        pipe = self._pipeline()
        size = (request.height, request.width)
        pos = self.encode_prompts([request.prompt], token, vectors, size)
        neg = self.encode_prompts([request.negative_prompt], token, vectors, size)
        kwargs: dict[str, Any] = {"prompt_embeds": pos.hidden, "negative_prompt_embeds": neg.hidden}
        if self.family == "sdxl":
            kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        return pipe(num_inference_steps=request.steps, guidance_scale=request.cfg_scale, height=request.height,
                    width=request.width, generator=generator, **kwargs).images[0]

    def _pipeline(self):
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = EulerDiscreteScheduler.from_config(self.scheduler_config)
        enc = self.encoders
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=enc[0].model, text_encoder_2=enc[1].model,
                                             tokenizer=enc[0].tokenizer, tokenizer_2=enc[1].tokenizer, unet=self.unet,
                                             scheduler=scheduler).to(self.device)
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=enc[0].model, tokenizer=enc[0].tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)


def load_engine(model: str, device: torch.device, weights: str = "auto",
                model_config: str | None = None, precision: str = "auto") -> StandaloneEngine:
    """``StandaloneEngine.load`` with the frozen weights' dtype from a name (auto, fp32, fp16, bf16; auto follows
    the run's ``precision``), saying so."""
    dtype = weights_dtype(weights, device, precision)
    say(f"loading {model} on {device} ({str(dtype).replace('torch.', '')})")
    return StandaloneEngine.load(model, device=device, dtype=dtype, config_dir=model_config)


# ---------------------------------------------------------------------- loading helpers
def _alphas_cumprod(config: dict) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config).alphas_cumprod.float()


def _load_folder(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
        raise TIError(
            f"model folder {str(path)!r} is not a diffusers Stable Diffusion folder (no unet/ or text_encoder/)"
        )
    load: dict[str, Any] = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **load)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **load)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    is_xl = (path / "text_encoder_2").is_dir()
    te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **load)
    tok1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **load)
    if is_xl:
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype, **load)
        tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **load)
        return unet, vae, [TextEncoder("clip_l", te1, tok1), TextEncoder("clip_g", te2, tok2)], sched, "sdxl"
    family = _one_encoder_family(te1, tok1)
    return unet, vae, [TextEncoder(encoder_key(family), te1, tok1)], sched, family


def _one_encoder_family(text_encoder, tokenizer) -> str:
    """SD2's OpenCLIP encoder uses GELU and pads with '!'; SD1's CLIP-L uses quick_gelu and pads with EOS."""
    is_openclip = text_encoder.config.hidden_act == "gelu" or tokenizer.pad_token_id != tokenizer.eos_token_id
    return "sd2" if is_openclip else "sd1"


def _load_single_file(path: Path, dtype: torch.dtype, config_dir: str | Path | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    is_xl = _single_file_is_sdxl(path)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    # Component configs come from a local diffusers folder (never the hub): the one given, else
    # "<stem>.diffusers" beside the file, as the tiny-model builder and `lib_ti` tools write it.
    config_dir = config_dir or next((p for p in [path.with_name(path.stem + ".diffusers")] if p.is_dir()), None)
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    if config_dir:
        kwargs["config"] = str(config_dir)
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as exc:
        raise TIError(
            f"could not load single-file checkpoint {str(path)!r} offline ({_first_line(exc)}): it is damaged or "
            "incomplete, or its component configs are missing; pass --model-config with a local diffusers folder "
            "of the same architecture"
        ) from exc
    if is_xl:
        encoders = [TextEncoder("clip_l", pipe.text_encoder, pipe.tokenizer),
                    TextEncoder("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]
        family = "sdxl"
    else:
        family = _one_encoder_family(pipe.text_encoder, pipe.tokenizer)
        encoders = [TextEncoder(encoder_key(family), pipe.text_encoder, pipe.tokenizer)]
    sched = dict(pipe.scheduler.config)
    pipe.vae.float()
    return pipe.unet, pipe.vae, encoders, sched, family


def _single_file_is_sdxl(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False  # .ckpt: SDXL is never distributed as .ckpt in practice
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())


def _first_line(exc: BaseException) -> str:
    """'OSError: ...': an exception's type and the first line of its message, cut short, for one-line errors."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _short_hash(path: Path) -> str:
    """The webui's short hash (first 10 hex of sha256) of the file holding the weights."""
    target = path
    if path.is_dir():
        candidates = sorted((path / "unet").glob("*.safetensors")) + sorted((path / "unet").glob("*.bin"))
        if not candidates:
            return ""
        target = candidates[0]
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
