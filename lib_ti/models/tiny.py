"""Tiny random-weight Stable Diffusion models in the real SD1 / SD2 / SDXL architectures.

They exist so tests can exercise every code path (loading, tokenizing, training,
saving, webui single files) offline and in seconds on a CPU. The layers, key names
and family quirks are the real ones; only the widths and depths are shrunk:

* UNet: 2 levels of (32, 64) channels, 2 resnets per level, GroupNorm(32) like ldm.
* VAE: 4 levels (32, 32, 64, 64), so the latent is 1/8 of the image as on real models
  (the webui hard-codes that factor).
* Text encoders: the full 49408-token CLIP vocabulary and 77 positions, so the real
  tokenizer works; 3 layers, 32 wide (SDXL's OpenCLIP-G encoder: 64 wide, projection 48,
  so the two SDXL encoders can never be confused for one another).

Every parameter gets a little seeded noise on top of its default init: LayerNorm and
GroupNorm weights would otherwise all be 1 and a key-mapping mix-up between two of
them would go unnoticed by the bit-exact round-trip tests.

``single_file=True`` also writes the checkpoint the AUTOMATIC1111 webui loads: one
``.safetensors`` in the original CompVis (SD1/SD2) or Stability sgm (SDXL) key layout,
a same-named ``.yaml`` original config, and the local folders that yaml points at.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import TIError
from ..families import NAMES
from ..formats.clip_tokenizer import EOS, MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer
from ..formats.model_files import save_diffusers, save_single_file, text_state
from ..libraries import quiet_libraries

PREDICTION_TYPES = ("epsilon", "v_prediction")
_DEFAULT_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}

IMAGE_SIZE = 64
_UNET_CHANNELS = (32, 64)
_LAYERS_PER_BLOCK = 2
_HEAD_CHANNELS = 8  # SD2 / SDXL give a head width (64 on real models), not a head count
_VAE_CHANNELS = (32, 32, 64, 64)
_TIME_EMBED_DIM = 8  # SDXL size/crop conditioning width per number (256 on the real model)
_VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

# Text encoder shapes by kind. clip_l: OpenAI CLIP-L (SD1, SDXL's first encoder); clip_h:
# OpenCLIP ViT-H (SD2); clip_g: OpenCLIP ViT-bigG (SDXL's second encoder, with projection).
_TEXT: dict[str, dict[str, Any]] = {
    "clip_l": {"hidden_size": 32, "hidden_act": "quick_gelu", "pad": EOS},
    "clip_h": {"hidden_size": 32, "hidden_act": "gelu", "pad": "!"},
    "clip_g": {"hidden_size": 64, "hidden_act": "gelu", "pad": "!", "projection_dim": 48},
}
_TEXT_LAYERS = 3
_BOS_ID, _EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1


def build_tiny_model(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    prediction_type: str | None = None,
    single_file: bool = False,
) -> Path:
    """Build a tiny random-weight ``family`` model ("sd1", "sd2" or "sdxl") into ``out_dir``.

    Without ``single_file`` it writes a diffusers folder (``pipeline.save_pretrained``,
    safetensors) and returns ``out_dir``. With ``single_file`` it writes, in ``out_dir``:

    * ``tiny-<family>.safetensors``: the original-layout checkpoint (returned),
    * ``tiny-<family>.yaml``: the matching original config,
    * ``tiny-<family>.clip_l/``: CLIP config + tokenizer, the yaml's ``version`` folder
      (SD1, SDXL),
    * ``tiny-<family>.open_clip/<arch>.json``: the OpenCLIP model config the yaml's
      ``arch`` names (SD2, SDXL); register it with ``open_clip.add_model_config``,
    * ``tiny-<family>.diffusers/``: the diffusers component configs without weights,
      the ``config=`` folder for diffusers' ``from_single_file``.

    ``prediction_type`` defaults to "v_prediction" for sd2 and "epsilon" otherwise.
    The same ``seed`` always gives the same weights, in either form.
    """
    prediction = _check_args(family, prediction_type)
    quiet_libraries()  # no per-shard progress bars from save_pretrained
    pipe = _build_pipeline(family, seed, prediction)
    out = Path(out_dir)
    if not single_file:
        save_diffusers(pipe, out)
        return out
    spare = None
    if family == "sd2":  # the OpenCLIP layer SD2 files keep beyond what diffusers uses (model_files)
        layer = _seeded(seed + 5, lambda: _text_encoder("clip_h", num_layers=1))
        spare = {k.removeprefix("encoder.layers.0."): v for k, v in text_state(layer).items()
                 if k.startswith("encoder.layers.0.")}
    return save_single_file(pipe, family, out, name=f"tiny-{family}", prediction=prediction, sd2_spare_layer=spare,
                            seed=seed)


def _check_args(family: str, prediction_type: str | None) -> str:
    if family not in NAMES:
        raise TIError(f"unknown model family {family!r}; use one of {', '.join(NAMES)}")
    prediction = prediction_type or _DEFAULT_PREDICTION[family]
    if prediction not in PREDICTION_TYPES:
        raise TIError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)} or None")
    return prediction


# --------------------------------------------------------------------------- building


def _seeded(seed: int, make):
    """Build a module from ``make()`` under its own seed, then jitter every parameter.

    fork_rng keeps the caller's global RNG untouched, so building a model never
    changes what a test's later random draws are.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    return module.eval()


def _build_pipeline(family: str, seed: int, prediction: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {
        "unet": _seeded(seed + 1, lambda: _unet(family)),
        "vae": _seeded(seed + 2, lambda: _vae(family)),
        "scheduler": sd_scheduler(prediction),
    }
    if family == "sdxl":
        parts["text_encoder"] = _seeded(seed + 3, lambda: _text_encoder("clip_l"))
        parts["text_encoder_2"] = _seeded(seed + 4, lambda: _text_encoder("clip_g", with_projection=True))
        parts["tokenizer"] = _tokenizer("clip_l")
        parts["tokenizer_2"] = _tokenizer("clip_g")
        return StableDiffusionXLPipeline(**parts, add_watermarker=False)
    kind = "clip_l" if family == "sd1" else "clip_h"
    parts["text_encoder"] = _seeded(seed + 3, lambda: _text_encoder(kind))
    parts["tokenizer"] = _tokenizer(kind)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _text_config(kind: str, num_layers: int = _TEXT_LAYERS):
    from transformers import CLIPTextConfig

    spec = _TEXT[kind]
    width = spec["hidden_size"]
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,  # OpenCLIP's fixed mlp_ratio; CLIP-L has it too
        num_attention_heads=width // _HEAD_CHANNELS,
        num_hidden_layers=num_layers,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=spec["hidden_act"],
        layer_norm_eps=1e-5,
        projection_dim=spec.get("projection_dim", width),
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,  # not the legacy 2: pool at the first EOS, whatever the pad token
        pad_token_id=0 if spec["pad"] == "!" else _EOS_ID,
    )


def _text_encoder(kind: str, with_projection: bool = False, num_layers: int = _TEXT_LAYERS):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_text_config(kind, num_layers))


def _tokenizer(kind: str):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, pad_token=_TEXT[kind]["pad"]))


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    n_levels = len(_UNET_CHANNELS)
    common = {
        "sample_size": IMAGE_SIZE // 2 ** (len(_VAE_CHANNELS) - 1),
        "block_out_channels": _UNET_CHANNELS,
        "layers_per_block": _LAYERS_PER_BLOCK,
        "norm_num_groups": 32,  # ldm's GroupNorm32: other values could not be written as a webui checkpoint
    }
    heads = tuple(c // _HEAD_CHANNELS for c in _UNET_CHANNELS)
    if family == "sdxl":
        # Real SDXL: no attention at the top level, deeper transformers further down.
        text_width = _TEXT["clip_l"]["hidden_size"] + _TEXT["clip_g"]["hidden_size"]
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_width,
            attention_head_dim=heads,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=_TIME_EMBED_DIM,
            # pooled clip_g projection + 6 numbers (original size, crop, target size)
            projection_class_embeddings_input_dim=_TEXT["clip_g"]["projection_dim"] + 6 * _TIME_EMBED_DIM,
        )
    # SD1/SD2: attention on every level but the lowest.
    down = ("CrossAttnDownBlock2D",) * (n_levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_levels - 1)
    kind = "clip_l" if family == "sd1" else "clip_h"
    extra: dict[str, Any]
    if family == "sd1":
        extra = {"attention_head_dim": 8}  # SD1's "head dim" is really its head count
    else:
        extra = {"attention_head_dim": heads, "use_linear_projection": True}
    return UNet2DConditionModel(
        **common, down_block_types=down, up_block_types=up, cross_attention_dim=_TEXT[kind]["hidden_size"], **extra
    )


def _vae(family: str):
    from diffusers import AutoencoderKL

    n_levels = len(_VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=_VAE_SCALING[family],
    )


def sd_scheduler(prediction: str):
    """The SD noise schedule (scaled-linear betas, 1000 steps) with the Euler sampler the webui defaults to."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
        timestep_spacing="leading",
        steps_offset=1,
    )
