"""LoRA files: module names in the kohya/webui key format, and the files written and read, in one place.

Written (``save_lora``): safetensors in the format kohya's sd-scripts write and every webui loads:

* per adapted module ``<name>.lora_down.weight`` [rank, in], ``<name>.lora_up.weight`` [out, rank] and
  ``<name>.alpha`` (a float32 scalar; the adapter adds ``up @ down * alpha / rank``);
* ``<name>`` is ``lora_unet_`` + the module's path in the original (ldm/sgm) UNet layout with "." -> "_"
  (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``), ``lora_te_`` (SD1/SD2) or
  ``lora_te1_``/``lora_te2_`` (SDXL) + the transformers CLIP path (``text_model_encoder_layers_0_self_attn_q_proj``).
  The webui maps ``lora_unet_<ldm path>`` straight onto its modules, for any UNet layout; kohya's own SD1
  files name UNet modules by their diffusers path instead (``lora_unet_down_blocks_0_attentions_0_...``),
  which the webui converts assuming the real models' two layers per block. Both are read here.
* header metadata in kohya's ``ss_*`` keys (``ss_network_dim``, ``ss_network_alpha``, ...) and
  ``sshs_model_hash``: the file's "addnet" hash (sha256 of the tensor data), which the webui shows in
  "Lora hashes".

Read (``load_lora``): that format (with or without ``.alpha``), and the diffusers/peft format
(``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``, older ``.lora.down.weight`` / ``.lora.up.weight``,
``text_encoder.`` / ``text_encoder_2.`` prefixes), whose diffusers UNet paths are renamed to the kohya names
here, with the UNet layout given (by default the real models' two layers per block).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import TIError
from ..fileio import write_bytes
from .embeddings import safetensors_bytes
from .model_files import unet_prefixes

UNET = "lora_unet"
# Text encoder prefixes by model family, in the order of the model's encoders.
TEXT_PREFIXES = {"sd1": ("lora_te",), "sd2": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version

# The layers an adapter may wrap, by target name; the same module paths in diffusers, ldm and sgm UNets and
# in transformers' CLIP (the webui's SD1 and SDXL clip_l encoders are transformers models too).
TARGET_PATTERNS = {
    "attn": re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "ff": re.compile(r"(^|\.)transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$"),
    "text": re.compile(r"(^|\.)encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"),
}
TARGETS = tuple(TARGET_PATTERNS)

# The real models' UNet layout (two layers per block), for diffusers-named files read without a model.
REAL_LAYOUT = SimpleNamespace(block_out_channels=(1, 1, 1, 1), layers_per_block=2,
                              up_block_types=("CrossAttnUpBlock2D",) * 4)


@dataclass
class LoraModule:
    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    modules: dict[str, LoraModule]  # kohya module name -> weights
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"  # "kohya" | "diffusers"


# ---------------------------------------------------------------------- names
def kohya_name(prefix: str, path: str) -> str:
    """``lora_unet`` + ``input_blocks.1.1.proj_in`` -> ``lora_unet_input_blocks_1_1_proj_in``."""
    return f"{prefix}_{path.replace('.', '_')}"


def ldm_unet_path(diffusers_path: str, unet_config: Any = REAL_LAYOUT) -> str:
    """A diffusers UNet module path in the original layout: ``down_blocks.0.attentions.1.X`` ->
    ``input_blocks.2.1.X`` (the block numbering of ldm/sgm, from the UNet's config)."""
    dotted = diffusers_path + "."
    for d_prefix, o_prefix, _ in unet_prefixes(unet_config):
        if dotted.startswith(d_prefix):
            return (o_prefix + dotted[len(d_prefix):]).rstrip(".")
    raise TIError(f"UNet module {diffusers_path!r} has no name in the original layout: it cannot be saved as a "
                  "kohya LoRA")


def unet_kohya_name(diffusers_path: str, unet_config: Any = REAL_LAYOUT) -> str:
    """The one conversion of a diffusers UNet module path to its kohya key name."""
    return kohya_name(UNET, ldm_unet_path(diffusers_path, unet_config))


def text_kohya_name(prefix: str, path: str) -> str:
    """A CLIP text-encoder module's kohya name: ``text_model.encoder.layers.0...`` whether or not the model's
    own path starts with ``text_model.`` (transformers 5 dropped it from CLIPTextModel)."""
    return kohya_name(prefix, "text_model." + path.removeprefix("text_model."))


def matches(targets: Iterable[str], path: str) -> bool:
    """Whether the module at ``path`` is one of ``targets`` ("attn", "ff", "text")."""
    return any(TARGET_PATTERNS[t].search(path) for t in targets)


# ---------------------------------------------------------------------- writing
def save_lora(modules: dict[str, LoraModule], path: str | Path, metadata: dict[str, str], *,
              overwrite: bool = False) -> Path:
    """Write ``modules`` as a kohya-format safetensors file, atomically; non-finite weights are never written."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TIError(f"a LoRA is written as .safetensors, got {path.name!r}")
    if path.exists() and not overwrite:
        raise TIError(f"{path} already exists: pick another file name or allow overwrite to replace it")
    if not modules:
        raise TIError(f"no LoRA modules to write to {path.name}")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors[f"{name}.lora_down.weight"] = _plain(module.down)
        tensors[f"{name}.lora_up.weight"] = _plain(module.up)
        tensors[f"{name}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    broken = sorted({k.split(".")[0] for k, v in tensors.items() if not bool(torch.isfinite(v).all())})
    if broken:
        raise TIError(f"LoRA module {broken[0]} holds NaN or infinite values: {path.name} was not written")
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"] = addnet_hash(safetensors_bytes(tensors, {}))
    write_bytes(path, safetensors_bytes(tensors, meta))
    return path


def addnet_hash(data: bytes) -> str:
    """sha256 of a safetensors file's tensor data (not its header): the hash kohya and the webui give a LoRA."""
    length = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + length:]).hexdigest()


def kohya_metadata(*, family: str, rank: int, alpha: float, dropout: float, targets: list[str], name: str,
                   steps: int, checkpoint_name: str, checkpoint_hash: str, trainer: str) -> dict[str, str]:
    """The ``ss_*`` metadata kohya's sd-scripts write (what the webui and civitai read), plus where it came from."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_dropout": f"{dropout:g}",
        "ss_network_args": json.dumps({"targets": targets}),
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, family),
        "ss_v2": str(family == "sd2"),
        "ss_output_name": name,
        "ss_steps": str(steps),
        "ss_sd_model_name": checkpoint_name,
        "ss_training_comment": f"pivotal tuning with the embedding {name!r} ({trainer})",
        "ti_trainer_sd_checkpoint": checkpoint_hash,
        "trainer": trainer,
    }


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


# ---------------------------------------------------------------------- reading
_KOHYA_KEY = re.compile(r"(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_PEFT_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                       r"lora_A\.default\.weight|lora_B\.default\.weight)")
_PEFT_PARTS = {"unet": UNET, "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def is_lora_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file holding LoRA weights (kohya or diffusers/peft keys)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return any(_KOHYA_KEY.fullmatch(k) or _PEFT_KEY.fullmatch(k) for k in f.keys())
    except Exception:  # not safetensors at all: the embedding reader says why
        return False


def load_lora(path: str | Path, *, unet_config: Any = REAL_LAYOUT, text_prefixes: tuple[str, ...] = ()) -> LoraFile:
    """A LoRA file's modules by kohya name, from the kohya or the diffusers/peft format.

    ``unet_config`` gives the UNet layout that diffusers paths are renamed with; ``text_prefixes`` the
    family's text-encoder prefixes (SD1: ``("lora_te",)``), so that a diffusers file's ``text_encoder.``
    is named as kohya names that encoder (default: ``lora_te1``).
    """
    from .embeddings import _read_safetensors

    path = Path(path)
    if not path.is_file():
        raise TIError(f"LoRA file {str(path)!r} does not exist")
    tensors, metadata = _read_safetensors(path)
    if any(_KOHYA_KEY.fullmatch(k) for k in tensors):
        return LoraFile(_kohya_modules(tensors, path), metadata, "kohya")
    if any(_PEFT_KEY.fullmatch(k) for k in tensors):
        # diffusers' files keep no alpha: its loaders scale by alpha = rank, as is done here
        return LoraFile(_peft_modules(tensors, path, unet_config, text_prefixes), metadata, "diffusers")
    raise TIError(f"{path.name} holds no LoRA weights (no .lora_down/.lora_up or .lora_A/.lora_B keys)")


def _kohya_modules(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, LoraModule]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KOHYA_KEY.fullmatch(key)
        if match:  # other keys (bundled embeddings, DoRA scales) are not ours to read
            parts.setdefault(match.group(1), {})[match.group(2)] = value
    out = {}
    for name, found in parts.items():
        down, up = found.get("lora_down.weight"), found.get("lora_up.weight")
        if down is None or up is None:
            raise TIError(f"{path.name}: LoRA module {name} lacks its lora_down or lora_up weight")
        alpha = float(found["alpha"]) if "alpha" in found else float(down.shape[0])  # kohya: no alpha = rank
        out[name] = _module(name, down, up, alpha, path)
    return dict(sorted(out.items()))


def _peft_modules(tensors: dict[str, torch.Tensor], path: Path, unet_config: Any,
                  text_prefixes: tuple[str, ...]) -> dict[str, LoraModule]:
    renames = dict(_PEFT_PARTS)
    for part, prefix in zip(("text_encoder", "text_encoder_2"), text_prefixes, strict=False):
        renames[part] = prefix
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if not match:
            continue
        where = match.group(1).removeprefix("base_model.model.")
        part, _, module_path = where.partition(".")
        if part not in renames:  # a bare peft file of one model: taken as the UNet's
            part, module_path = "unet", where
        name = (unet_kohya_name(module_path, unet_config) if part == "unet"
                else text_kohya_name(renames[part], module_path))
        kind = "down" if ("lora_A" in match.group(2) or "down" in match.group(2)) else "up"
        pairs.setdefault(name, {})[kind] = value
    out = {}
    for name, found in pairs.items():
        if "down" not in found or "up" not in found:
            raise TIError(f"{path.name}: LoRA module {name} lacks its lora_A or lora_B weight")
        out[name] = _module(name, found["down"], found["up"], float(found["down"].shape[0]), path)
    return dict(sorted(out.items()))


def _module(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float, path: Path) -> LoraModule:
    down, up = down.float(), up.float()
    if down.ndim == 4:  # a 1x1 convolution's adapter: the same matrices
        down, up = down.flatten(1), up.flatten(1)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TIError(f"{path.name}: LoRA module {name} has down {list(down.shape)} and up {list(up.shape)}, "
                      "which do not make a low-rank pair")
    return LoraModule(down, up, alpha)
