"""A diffusers pipeline on disk: as a diffusers folder, or as the single-file checkpoint the webuis load.

A single file is one ``.safetensors`` in the original key layout (CompVis ldm for SD1/SD2,
Stability sgm for SDXL) with a same-named ``.yaml`` original config, as the AUTOMATIC1111 webui
expects; ``save_single_file`` converts the diffusers components' keys and writes both. Used for
the tiny test models and the shipped micro model; real-size models built with random weights
convert the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import TIError
from .clip_tokenizer import MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

_LOGIT_SCALE = math.log(1 / 0.07)  # OpenCLIP's initial logit scale; stored in real SD2/SDXL files


def save_diffusers(pipe, out: Path) -> None:
    """``pipe.save_pretrained`` (safetensors) plus tokenizer files that every transformers version reads."""
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; vocab.json + merges.txt also let older
    # transformers read the folder with the (slow) CLIPTokenizer that model_index.json names.
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            write_clip_tokenizer(out / name, pad_token=tokenizer.pad_token)


def save_single_file(pipe, family: str, out_dir: str | Path, *, name: str, prediction: str = "epsilon",
                     sd2_spare_layer: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                     clip_folder: str | None = None, config_folder: bool = True) -> Path:
    """Write ``pipe`` as ``<name>.safetensors`` in the original layout, with ``<name>.yaml`` beside it.

    Also written beside it, unless the options say where they already are:

    * ``<name>.clip_l/`` (SD1, SDXL): the CLIP config + tokenizer folder the yaml's ``version``
      names; ``clip_folder`` instead names an existing such folder (written into the yaml as given);
    * ``<name>.open_clip/<arch>.json`` (SD2, SDXL): the OpenCLIP model config the yaml's ``arch``
      names; register it with ``open_clip.add_model_config``;
    * ``<name>.diffusers/`` when ``config_folder``: the diffusers component configs without
      weights, the ``config=`` folder of diffusers' ``from_single_file``.

    SD2 files hold one OpenCLIP layer more than diffusers keeps (SD2 conditions on the penultimate
    layer) and an unused projection; ``sd2_spare_layer`` gives that layer's weights (HF CLIP layer
    keys: ``layer_norm1.weight``, ...), the projection is drawn from ``seed``. Their values never
    affect the conditioning, but the webui's OpenCLIP embedder expects them.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {**_unet_to_ldm(pipe.unet), **_vae_to_ldm(pipe.vae)}
    if family == "sd1":
        state.update(_clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    elif family == "sd2":
        if sd2_spare_layer is None:
            raise TIError("an SD2 single file needs the spare OpenCLIP layer's weights (sd2_spare_layer)")
        state.update(_sd2_text_to_openclip(pipe.text_encoder, sd2_spare_layer, seed))
    else:
        state.update(_clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(_clip_to_openclip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    ckpt = out / f"{name}.safetensors"
    save_file(state, ckpt, metadata={"format": "pt"})
    folders = _write_side_folders(pipe, family, out / name, clip_folder, config_folder)
    _write_yaml(ckpt.with_suffix(".yaml"), _original_config(pipe, family, prediction, folders))
    return ckpt


def _write_side_folders(pipe, family: str, stem: Path, clip_folder: str | None, config_folder: bool) -> dict[str, str]:
    """Write the folders the yaml and diffusers' ``from_single_file`` need; return the yaml's paths."""
    if config_folder:
        diffusers_dir = stem.with_name(stem.name + ".diffusers")
        save_diffusers(pipe, diffusers_dir)
        for weights in [*diffusers_dir.rglob("*.safetensors"), *diffusers_dir.rglob("*.bin")]:
            weights.unlink()  # configs only: the weights must come from the single file
    folders: dict[str, str] = {}
    if family in ("sd1", "sdxl"):
        if clip_folder is None:
            clip_dir = stem.with_name(stem.name + ".clip_l")
            pipe.text_encoder.config.save_pretrained(clip_dir)
            write_clip_tokenizer(clip_dir)
            clip_folder = str(clip_dir.resolve())
        folders["clip_l"] = clip_folder
    if family in ("sd2", "sdxl"):
        encoder = pipe.text_encoder if family == "sd2" else pipe.text_encoder_2
        arch = f"{stem.name}-{'clip_h' if family == 'sd2' else 'clip_g'}"
        extra_layers = 1 if family == "sd2" else 0
        _write_open_clip_config(stem.with_name(stem.name + ".open_clip") / f"{arch}.json", encoder.config, extra_layers)
        folders["open_clip_arch"] = arch
    return folders


def _write_open_clip_config(path: Path, text_config, extra_layers: int) -> None:
    """Write an open_clip model config for the webui's OpenCLIP embedders (they build the model by arch name)."""
    import json

    width = text_config.hidden_size
    config = {
        "embed_dim": text_config.projection_dim,
        # Never loaded (the embedders delete the visual tower) but open_clip needs one to build CLIP.
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 16},
        "text_cfg": {
            "context_length": MAX_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "width": width,
            "heads": text_config.num_attention_heads,
            "layers": text_config.num_hidden_layers + extra_layers,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


# UNet: diffusers resnet names -> ldm ResBlock names.
_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is_resnet) for every UNet submodule, following ldm's block numbering."""
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    n_levels, per_level = len(config.block_out_channels), config.layers_per_block
    block = 1  # input_blocks.0 is conv_in
    for level in range(n_levels):
        for j in range(per_level):
            pairs.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{block}.0.", True))
            pairs.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{block}.1.", False))
            block += 1
        if level < n_levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", False))
            block += 1
    block = 0
    for level in range(n_levels):
        for j in range(per_level + 1):
            pairs.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{block}.0.", True))
            pairs.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{block}.1.", False))
            block += 1
        if level < n_levels - 1:
            # the upsampler sits after the last resnet (and its attention, when the level has one)
            slot = 2 if "CrossAttn" in config.up_block_types[level] else 1
            pairs.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{block - 1}.{slot}.", False))
    return pairs


def _rename_all(state: dict, prefixes, inner: dict[str, str], where: str) -> dict:
    """Rename every key by its matching prefix; ``inner`` renames apply after a flagged prefix."""
    out = {}
    for key, value in state.items():
        match = next(((d, o, flag) for d, o, flag in prefixes if key.startswith(d)), None)
        if match is None:
            raise TIError(
                f"{where}: no original-layout name for {key!r}; the converter's key map is incomplete for this "
                "architecture"
            )
        d_prefix, o_prefix, flagged = match
        rest = key[len(d_prefix) :]
        if flagged:
            head, _, tail = rest.partition(".")
            rest = f"{inner.get(head, head)}.{tail}"
        out[o_prefix + rest] = value
    return out


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    if not isinstance(unet.config.layers_per_block, int):
        raise TIError(
            f"unet layers_per_block={unet.config.layers_per_block!r}: only one value for all levels can be converted"
        )
    state = _rename_all(unet.state_dict(), unet_prefixes(unet.config), _RESNET_LDM, "unet")
    return {"model.diffusion_model." + k: v for k, v in state.items()}


_VAE_ATTENTION_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_prefixes(config) -> list[tuple[str, str, bool]]:
    n_levels = len(config.block_out_channels)
    pairs = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", False),
        ("decoder.conv_norm_out.", "decoder.norm_out.", False),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", True),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", True),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", False),  # renamed in _vae_to_ldm
            (f"{part}.conv_in.", f"{part}.conv_in.", False),
            (f"{part}.conv_out.", f"{part}.conv_out.", False),
        ]
    for level in range(n_levels):
        pairs.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", False))
        pairs.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", False))
        # the decoder counts its levels from the bottom in ldm
        up = n_levels - 1 - level
        pairs.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{up}.block.", False))
        pairs.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{up}.upsample.", False))
    pairs += [("quant_conv.", "quant_conv.", False), ("post_quant_conv.", "post_quant_conv.", False)]
    return pairs


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    state = _rename_all(vae.state_dict(), _vae_prefixes(vae.config), {}, "vae")
    out = {}
    for key, value in state.items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key:
            head, _, tail = key.partition(".mid.attn_1.")
            name, _, param = tail.rpartition(".")
            name = _VAE_ATTENTION_LDM[name.split(".")[0]]  # "to_out.0" -> "proj_out"
            key = f"{head}.mid.attn_1.{name}.{param}"
            if value.ndim == 2:  # ldm's AttnBlock uses 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    return out


def text_state(encoder) -> dict[str, torch.Tensor]:
    """The encoder's state dict with keys relative to the text model (no "text_model." prefix).

    transformers >= 5.6 dropped that prefix from CLIPTextModel but not from
    CLIPTextModelWithProjection; originals always had it.
    """
    return {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}


def _clip_to_ldm(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP keys under ``prefix + "text_model."``, as ldm's FrozenCLIPEmbedder stores them."""
    state = {f"{prefix}text_model.{k}": v for k, v in text_state(encoder).items()}
    # Real SD1/SDXL files carry this buffer (persistent in the transformers of their time).
    state[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(MAX_LENGTH, dtype=torch.int64)[None]
    return state


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _openclip_layer(state: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    """One HF CLIP encoder layer (keys under ``src``) as an OpenCLIP resblock (under ``dst``)."""
    out = {}
    for param in ("weight", "bias"):
        # nn.MultiheadAttention packs q, k, v into one in_proj, in that order
        qkv = [state[f"{src}self_attn.{p}_proj.{param}"] for p in "qkv"]
        out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
        for hf, oc in _OPENCLIP_LAYER.items():
            out[f"{dst}{oc}.{param}"] = state[f"{src}{hf}.{param}"]
    return out


def _clip_to_openclip(encoder, prefix: str, extra_layer=None) -> dict[str, torch.Tensor]:
    """HF CLIP text keys as OpenCLIP's ``TextTransformer`` stores them, under ``prefix``.

    ``extra_layer`` (an HF encoder layer state, keys "layer_norm1.weight" ...) is
    appended as the last resblock: SD2 keeps one more layer than it uses.
    """
    state = text_state(encoder)
    n_layers = encoder.config.num_hidden_layers
    out = {
        f"{prefix}token_embedding.weight": state["embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": state["embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": state["final_layer_norm.weight"],
        f"{prefix}ln_final.bias": state["final_layer_norm.bias"],
        f"{prefix}logit_scale": torch.tensor(_LOGIT_SCALE),
    }
    for i in range(n_layers):
        out.update(_openclip_layer(state, f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."))
    if extra_layer is not None:
        out.update(_openclip_layer(extra_layer, "", f"{prefix}transformer.resblocks.{n_layers}."))
    if "text_projection.weight" in state:  # OpenCLIP multiplies x @ proj, HF applies Linear: transposed
        out[f"{prefix}text_projection"] = state["text_projection.weight"].T
    return out


def _sd2_text_to_openclip(encoder, spare_layer: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """SD2's OpenCLIP-H layout: one resblock more than diffusers keeps, plus an unused projection."""
    out = _clip_to_openclip(encoder, "cond_stage_model.model.", extra_layer=spare_layer)
    width = encoder.config.hidden_size
    generator = torch.Generator().manual_seed(seed + 6)
    out["cond_stage_model.model.text_projection"] = torch.randn(width, width, generator=generator) * width**-0.5
    return out


# --------------------------------------------------------------------------- original yaml


def _write_yaml(path: Path, config: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _ldm_unet_params(unet, family: str) -> dict:
    """The openaimodel.UNetModel params that rebuild ``unet`` (ldm for SD1/SD2, sgm for SDXL)."""
    cfg = unet.config
    base = cfg.block_out_channels[0]
    attention_levels = [2**i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t]
    params = {
        "use_checkpoint": False,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": base,
        "attention_resolutions": attention_levels,
        "num_res_blocks": cfg.layers_per_block,
        "channel_mult": [c // base for c in cfg.block_out_channels],
        "use_spatial_transformer": True,
        "transformer_depth": 1 if family != "sdxl" else list(cfg.transformer_layers_per_block),
        "context_dim": cfg.cross_attention_dim,
        "legacy": False,
    }
    if family == "sd1":
        params["num_heads"] = cfg.attention_head_dim  # diffusers' "head dim" is SD1's head count
    else:
        params.update(num_head_channels=_head_channels(cfg), use_linear_in_transformer=True)
    if family == "sdxl":
        params.update(adm_in_channels=cfg.projection_class_embeddings_input_dim, num_classes="sequential")
        params["spatial_transformer_attn_type"] = "softmax-xformers"
    else:
        params.update(image_size=cfg.sample_size, use_fp16=False)
    return params


def _head_channels(cfg) -> int:
    """SD2/SDXL configs give heads per level; ldm/sgm take the (constant) channels per head."""
    heads = cfg.attention_head_dim
    level = next(i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t)
    count = heads[level] if isinstance(heads, (list, tuple)) else heads
    return cfg.block_out_channels[level] // count


def _ldm_vae_params(vae, target: str) -> dict:
    cfg = vae.config
    base = cfg.block_out_channels[0]
    ddconfig = {
        "double_z": True,
        "z_channels": cfg.latent_channels,
        "resolution": 256,
        "in_channels": cfg.in_channels,
        "out_ch": cfg.out_channels,
        "ch": base,
        "ch_mult": [c // base for c in cfg.block_out_channels],
        "num_res_blocks": cfg.layers_per_block,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {"embed_dim": cfg.latent_channels, "monitor": "val/rec_loss", "ddconfig": ddconfig}
    return {"target": target, "params": {**params, "lossconfig": {"target": "torch.nn.Identity"}}}


def _original_config(pipe, family: str, prediction: str, folders: dict[str, str]) -> dict:
    if family == "sdxl":
        return _sgm_config(pipe, prediction, folders)
    params = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": pipe.unet.config.sample_size,
        "channels": pipe.unet.config.in_channels,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": pipe.vae.config.scaling_factor,
        "use_ema": False,
    }
    if prediction == "v_prediction":
        params["parameterization"] = "v"
    if family == "sd1":
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"version": folders["clip_l"]}}
    else:
        # version None: build from the arch config alone, never download pretrained weights
        cond_params = {"arch": folders["open_clip_arch"], "version": None, "freeze": True, "layer": "penultimate"}
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": cond_params}
    params["unet_config"] = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": _ldm_unet_params(pipe.unet, family),
    }
    params["first_stage_config"] = _ldm_vae_params(pipe.vae, "ldm.models.autoencoder.AutoencoderKL")
    params["cond_stage_config"] = cond
    target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    return {"model": {"base_learning_rate": 1.0e-4, "target": target, "params": params}}


def _sgm_embedders(pipe, folders: dict[str, str]) -> list[dict]:
    """sd_xl_base.yaml's conditioner: CLIP-L, OpenCLIP-G, then the three size/crop embedders."""
    clip_l_layers = pipe.text_encoder.config.num_hidden_layers
    open_clip_params = {
        "arch": folders["open_clip_arch"],
        "version": None,
        "freeze": True,
        "layer": "penultimate",
        "always_return_pooled": True,
        "legacy": False,
    }
    # layer_idx n_layers - 1 is the penultimate hidden state, like diffusers' hidden_states[-2]
    clip_l_params = {"layer": "hidden", "layer_idx": clip_l_layers - 1, "version": folders["clip_l"]}
    modules = "sgm.modules.encoders.modules"
    outdim = {"outdim": pipe.unet.config.addition_time_embed_dim}
    rows = [("txt", "FrozenCLIPEmbedder", clip_l_params), ("txt", "FrozenOpenCLIPEmbedder2", open_clip_params)]
    for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
        rows.append((key, "ConcatTimestepEmbedderND", outdim))
    return [
        {"is_trainable": False, "input_key": key, "target": f"{modules}.{cls}", "params": params}
        for key, cls, params in rows
    ]


def _sgm_config(pipe, prediction: str, folders: dict[str, str]) -> dict:
    kind = "V" if prediction == "v_prediction" else "Eps"
    denoiser = "sgm.modules.diffusionmodules.denoiser"
    discretizer = "sgm.modules.diffusionmodules.discretizer"
    embedders = _sgm_embedders(pipe, folders)
    params = {
        "scale_factor": pipe.vae.config.scaling_factor,
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": f"{denoiser}.DiscreteDenoiser",
            "params": {
                "num_idx": 1000,
                "weighting_config": {"target": f"{denoiser}_weighting.{kind}Weighting"},
                "scaling_config": {"target": f"{denoiser}_scaling.{kind}Scaling"},
                "discretization_config": {"target": f"{discretizer}.LegacyDDPMDiscretization"},
            },
        },
        "network_config": {
            "target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": _ldm_unet_params(pipe.unet, "sdxl"),
        },
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": _ldm_vae_params(pipe.vae, "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"),
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}

