"""Component configs of the real architectures, for random-weight models of the true size.

Speed and memory do not depend on weight values, so benchmarks on machines that cannot download
weights build these with random weights (performance.md, 4.1). Facts from the public model configs.
"""

from __future__ import annotations

from typing import Any

from ..engines.standalone import StandaloneEngine, TextEncoder
from ..formats.clip_tokenizer import write_clip_tokenizer

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}

CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

UNET_SD15 = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
UNET_SD21 = dict(UNET_SD15, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True)
UNET_SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

ARCHES: dict[str, dict[str, Any]] = {
    "sd15": {
        "family": "sd1",
        "unet": UNET_SD15,
        "vae": VAE,
        "encoders": [("clip_l", CLIP_L, False)],
        "scheduler": SCHEDULER,
    },
    "sd21": {
        "family": "sd2",
        "unet": UNET_SD21,
        "vae": VAE,
        "encoders": [("clip_h", OPENCLIP_H, False)],
        "scheduler": dict(SCHEDULER, prediction_type="v_prediction"),
    },
    "sdxl": {
        "family": "sdxl",
        "unet": UNET_SDXL,
        "vae": dict(VAE, scaling_factor=0.13025, sample_size=1024),
        "encoders": [("clip_l", CLIP_L, False), ("clip_g", OPENCLIP_BIGG, True)],
        "scheduler": SCHEDULER,
    },
}


def build_random_engine(arch: str, *, device, dtype, seed: int = 0):
    """A StandaloneEngine of the real architecture ``arch`` with random weights, built in memory."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = ARCHES[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"]).to(device=device, dtype=dtype)
    vae = AutoencoderKL(**spec["vae"]).to(device=device)
    encoders = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, config, with_projection in spec["encoders"]:
            pad = "!" if config["hidden_act"] == "gelu" else "<|endoftext|>"
            tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(f"{tmp}/{key}", pad_token=pad))
            model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            model = model_cls(CLIPTextConfig(**config)).to(device=device, dtype=dtype)
            encoders.append(TextEncoder(key, model, tokenizer))
    return StandaloneEngine(unet, vae, encoders, spec["scheduler"], family=spec["family"], device=torch.device(device),
                            checkpoint_name=f"random-{arch}")
