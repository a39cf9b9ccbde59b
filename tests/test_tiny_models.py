"""Tiny SD models: offline tokenizer files, diffusers folders that load and generate,
and original-layout single files that round-trip bit-exactly through diffusers."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from lib_ti.errors import TIError
from lib_ti.families import NAMES as FAMILIES
from lib_ti.formats.clip_tokenizer import write_clip_tokenizer
from lib_ti.models.tiny import build_tiny_model

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP tokenizer


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _components(pipe) -> dict[str, nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _load_single_file(ckpt):
    """The diffusers call that loads our single files fully offline (see lib_ti.models.tiny)."""
    config_dir = ckpt.with_name(ckpt.stem + ".diffusers")
    family = ckpt.stem.split("-")[1]
    return _pipeline_class(family).from_single_file(str(ckpt), config=str(config_dir), local_files_only=True)


# --------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_files_give_real_clip_ids(tmp_path):
    import transformers

    path = write_clip_tokenizer(tmp_path)
    assert transformers.CLIPTokenizer.from_pretrained(path)("a photo of a cat").input_ids == CAT_IDS
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None:
        assert fast.from_pretrained(path)("a photo of a cat").input_ids == CAT_IDS


def test_openclip_tokenizer_pads_with_exclamation_mark(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token="!"))
    ids = tokenizer("a cat", padding="max_length", max_length=6).input_ids
    assert (tokenizer.pad_token_id, ids) == (0, [49406, 320, 2368, 49407, 0, 0])


def test_unknown_pad_token_is_refused(tmp_path):
    with pytest.raises(TIError, match="pad_token"):
        write_clip_tokenizer(tmp_path, pad_token="<pad>")


# --------------------------------------------------------------------------- diffusers folders


def test_bad_arguments_name_the_choices(tmp_path):
    with pytest.raises(TIError, match="sd1, sd2, sdxl"):
        build_tiny_model("sd3", tmp_path)
    with pytest.raises(TIError, match="v_prediction"):
        build_tiny_model("sd1", tmp_path, prediction_type="flow")


def test_same_seed_same_weights_other_seed_other_weights():
    from lib_ti.models.tiny import _build_pipeline

    first, again, other = (_build_pipeline("sd1", seed, "epsilon").text_encoder.state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["embeddings.token_embedding.weight"], other["embeddings.token_embedding.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_and_generates(tiny_model, family):
    pipe = _pipeline_class(family).from_pretrained(tiny_model(family), local_files_only=True)
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
    unet = pipe.unet.config
    if family == "sd1":
        assert (pipe.text_encoder.config.eos_token_id, pipe.scheduler.config.prediction_type) == (49407, "epsilon")
    if family == "sd2":
        assert (pipe.tokenizer.pad_token, pipe.text_encoder.config.hidden_act) == ("!", "gelu")
        assert unet.use_linear_projection and pipe.scheduler.config.prediction_type == "v_prediction"
    if family == "sdxl":
        widths = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
        assert unet.cross_attention_dim == sum(widths) and widths[0] != widths[1]
        assert unet.addition_embed_type == "text_time" and pipe.tokenizer_2.pad_token == "!"
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_sd2_accepts_epsilon(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model("sd2", prediction_type="epsilon"), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"


# --------------------------------------------------------------------------- single files


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_is_bit_exact(tiny_model, family):
    reference = _pipeline_class(family).from_pretrained(tiny_model(family), local_files_only=True)
    loaded = _load_single_file(tiny_model(family, single_file=True))
    for name, module in _components(reference).items():
        expected, got = module.state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{name}: {different[:5]}"
    assert loaded.scheduler.config.prediction_type == reference.scheduler.config.prediction_type


@pytest.mark.parametrize(
    ("family", "text_keys", "target"),
    [
        ("sd1", ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"], "FrozenCLIPEmbedder"),
        ("sd2", ["cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"], "FrozenOpenCLIPEmbedder"),
        (
            "sdxl",
            [
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.text_projection",
            ],
            "GeneralConditioner",
        ),
    ],
)
def test_single_file_layout_and_yaml(tiny_model, family, text_keys, target):
    ckpt = tiny_model(family, single_file=True)
    keys = load_file(ckpt).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert all(k in keys for k in text_keys)
    params = yaml.safe_load(ckpt.with_suffix(".yaml").read_text())["model"]["params"]
    cond = params.get("cond_stage_config") or params["conditioner_config"]
    assert cond["target"].endswith(target)
    if family == "sd2":
        assert params["parameterization"] == "v" and params["unet_config"]["params"]["use_linear_in_transformer"]
    if family != "sd2":  # the CLIP-L embedder takes a local folder as its "version"
        version = cond["params"]["version"] if family == "sd1" else cond["params"]["emb_models"][0]["params"]["version"]
        assert (ckpt.parent / version / "config.json").is_file() and (ckpt.parent / version / "vocab.json").is_file()


class _ResBlock(nn.Module):
    """OpenCLIP's ResidualAttentionBlock, with its parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        mlp = OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        self.mlp = nn.Sequential(mlp)

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


def _openclip_text(state: dict, prefix: str, heads: int) -> nn.Module:
    """An OpenCLIP TextTransformer loaded strictly from ``state`` (proves every name and shape)."""
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    vocab, width = state["token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    model = nn.Module()
    model.token_embedding = nn.Embedding(vocab, width)
    model.positional_embedding = nn.Parameter(torch.empty_like(state["positional_embedding"]))
    model.transformer = nn.Module()
    model.transformer.resblocks = nn.ModuleList(_ResBlock(width, heads) for _ in range(layers))
    model.ln_final = nn.LayerNorm(width)
    model.text_projection = nn.Parameter(torch.empty_like(state["text_projection"]))
    model.logit_scale = nn.Parameter(torch.empty(()))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _openclip_forward(model, ids):
    """(penultimate hidden states, pooled projection), as the webui's OpenCLIP embedders compute them."""
    x = (model.token_embedding(ids) + model.positional_embedding).transpose(0, 1)  # sequence first
    mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
    for block in model.transformer.resblocks[:-1]:
        x = block(x, mask)
    penultimate = x.transpose(0, 1)
    last = model.ln_final(model.transformer.resblocks[-1](x, mask).transpose(0, 1))
    pooled = last[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ model.text_projection
    return penultimate, pooled


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_openclip_keys_compute_what_diffusers_computes(tiny_model, family):
    """Independent of diffusers' converter: the OpenCLIP weights (packed qkv, transposed
    projection, SD2's spare last layer) give the diffusers encoder's conditioning."""
    reference = _pipeline_class(family).from_pretrained(tiny_model(family), local_files_only=True)
    encoder = reference.text_encoder if family == "sd2" else reference.text_encoder_2
    tokenizer = reference.tokenizer if family == "sd2" else reference.tokenizer_2
    ids = tokenizer(["a photo of a cat", "two dogs"], padding="max_length", return_tensors="pt").input_ids
    prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
    model = _openclip_text(load_file(tiny_model(family, single_file=True)), prefix, encoder.config.num_attention_heads)
    with torch.no_grad():
        penultimate, pooled = _openclip_forward(model, ids)
        out = encoder(ids, output_hidden_states=True)
    if family == "sd2":  # SD2: ln_final(penultimate) == diffusers' last_hidden_state (one layer fewer)
        torch.testing.assert_close(model.ln_final(penultimate), out.last_hidden_state, rtol=1e-4, atol=1e-5)
    else:  # SDXL: raw penultimate == hidden_states[-2]; pooled == text_embeds
        torch.testing.assert_close(penultimate, out.hidden_states[-2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pooled, out.text_embeds, rtol=1e-4, atol=1e-5)
