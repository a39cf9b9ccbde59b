"""The micro model's architecture, and how it is written to disk.

Real SD1 layer types and key names (``UNet2DConditionModel`` with cross-attention, ``AutoencoderKL``
with the 8x downsampling and 4 latent channels, a CLIP text encoder over the real 49408-token
vocabulary, the SD noise schedule), shrunk until pretraining fits an hour of a 2-core CPU and
the weights fit the repository. The sizes, and why:

* text encoder: 48 wide (4 heads of 12), 3 layers. Its token table (49408 x 48) is most of the
  model's bytes; the world's ~60 words need far less width, but a TI vector of 48 numbers still
  has room to learn.
* UNet: three levels (8x8, 4x4, 2x2 latents) of 64 channels, cross-attention on the first two,
  one resnet per level: 2.1 M parameters.
* VAE: 64 channels at every level, one resnet per level. Its full-resolution convolutions are the
  most expensive part of pretraining, so it trains on 32x32 crops.

Everything is channel-count compatible with ldm/sgm, so ``formats.model_files.save_single_file`` writes the webui
checkpoint and its yaml.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..formats.clip_tokenizer import EOS, MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer
from ..formats.model_files import save_diffusers, save_single_file
from ..models.tiny import sd_scheduler
from .shapes import IMAGE_SIZE

NAME = "micro-sd"
TEXT_WIDTH = 48
TEXT_LAYERS = 3
TEXT_HEADS = 4  # 12-wide heads
UNET_CHANNELS = (64, 64, 64)
UNET_HEADS = 4  # SD1's attention_head_dim is a head count: 4 heads of 16 channels
VAE_CHANNELS = (64, 64, 64, 64)
LATENT_SIZE = IMAGE_SIZE // 8


def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=TEXT_HEADS, num_hidden_layers=TEXT_LAYERS, max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu", projection_dim=TEXT_WIDTH, layer_norm_eps=1e-5,
        bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
    )
    return CLIPTextModel(config)


def tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, pad_token=EOS))


def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, block_out_channels=UNET_CHANNELS, layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=UNET_HEADS,
    )


def vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=VAE_CHANNELS, layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=IMAGE_SIZE, scaling_factor=scaling_factor,
    )


def pipeline(unet_model, vae_model, text_model):
    """A diffusers SD1 pipeline of the parts (nothing is copied)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae_model, text_encoder=text_model, tokenizer=tokenizer(), unet=unet_model,
                                   scheduler=sd_scheduler("epsilon"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_model(pipe, out_dir: str | Path, *, clip_root: str) -> dict[str, Path]:
    """Write the fp16 model as ``<NAME>.diffusers/`` (a complete diffusers folder, which is also the
    config folder the single file is loaded with) and ``<NAME>.safetensors`` + ``<NAME>.yaml`` (the
    webui's single file).

    The yaml's CLIP ``version`` must be a folder with the CLIP config and the tokenizer: the diffusers
    folder's ``tokenizer/`` gets a copy of the text encoder's ``config.json`` and serves (1.5 MB of
    tokenizer files are not shipped twice). ``clip_root`` is where the yaml says ``out_dir`` is, as the
    webui will resolve it (from its own working directory).
    """
    import shutil

    out = Path(out_dir)
    pipe = pipe.to(torch.float16)
    folder = out / f"{NAME}.diffusers"
    save_diffusers(pipe, folder)
    for duplicate in folder.rglob("tokenizer.json"):
        duplicate.unlink()  # 3.5 MB that vocab.json + merges.txt already hold
    shutil.copy(folder / "text_encoder" / "config.json", folder / "tokenizer" / "config.json")
    clip_folder = f"{clip_root.rstrip('/')}/{NAME}.diffusers/tokenizer"
    single = save_single_file(pipe, "sd1", out, name=NAME, clip_folder=clip_folder, config_folder=False)
    return {"diffusers": folder, "single_file": single, "yaml": single.with_suffix(".yaml")}
