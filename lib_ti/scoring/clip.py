"""A CLIP model for scoring renders, from local files only.

``load_clip(model)`` takes a local folder (``config.json``, weights, tokenizer files, as
``save_pretrained`` or ``hf download`` write them) or a model id already in the local Hugging Face
cache; nothing is downloaded at run time. Images are prepared here (resize the short side, centre
crop, CLIP's mean and std) rather than by a transformers image processor, so no torchvision and no
processor file are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..errors import TIError
from ..libraries import quiet_libraries
from .defaults import DEFAULT_CLIP

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Clip:
    """Unit-length CLIP features of images and texts, on one device, in float32."""

    def __init__(self, model, tokenizer, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.image_size = int(model.config.vision_config.image_size)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch: int = 16) -> torch.Tensor:
        feats = [self.model.get_image_features(pixel_values=self.pixels(images[i:i + batch]))
                 for i in range(0, len(images), batch)]
        return _unit(torch.cat(_tensors(feats)))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        feats = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                             attention_mask=tokens.attention_mask.to(self.device))
        return _unit(_tensors([feats])[0])

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return pixel_batch(images, self.image_size).to(self.device)


def prepare_image(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's preprocessing: the short side resized to ``size`` (bicubic), a centre crop, CLIP's mean and std."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


def pixel_batch(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """[N, 3, size, size]: ``prepare_image`` of each image."""
    return torch.stack([prepare_image(im, size) for im in images])


def features(output) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features`` as a tensor: newer transformers may return a model
    output object rather than a tensor; then its pooled features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _tensors(outputs: list) -> list[torch.Tensor]:
    return [features(o) for o in outputs]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def load_clip(model: str = DEFAULT_CLIP, *, device: str | torch.device = "cpu") -> Clip:
    """A CLIP model from a local folder or a cached model id, in float32 on ``device``."""
    source = locate_clip(model)
    from transformers import CLIPModel, CLIPTokenizer

    quiet_libraries()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
        net = CLIPModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TIError(f"CLIP model {model!r} could not be loaded from {source}: {type(e).__name__}: {e}. A CLIP model "
                      "folder holds config.json, the weights and the tokenizer files (vocab.json, merges.txt), as "
                      f"`{clip_download_command('DIR')}` writes them") from None
    device = torch.device(device)
    return Clip(net.to(device=device, dtype=torch.float32).eval(), tokenizer, device)


def locate_clip(model: str, *, use: str = "pass it with --clip models/clip-vit-b32") -> str:
    """``model`` if it is a local folder or a model id in the local Hugging Face cache; else a TIError saying how
    to get one."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise TIError(f"CLIP model {model!r} is a file; give the model's folder (config.json, weights, tokenizer "
                      "files)")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a model id either (e.g. "./models/clip" that does not exist)
        cached = None
    if isinstance(cached, str):
        return model
    raise TIError(
        f"no CLIP model {model!r}: there is no such folder, and no model id {model!r} in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}). Nothing is downloaded at run time. On a machine with internet run "
        f"`{clip_download_command('models/clip-vit-b32')}` (with an older huggingface_hub: `huggingface-cli download "
        f"...`, same arguments), copy that folder here and {use}, or copy that "
        f"machine's Hugging Face cache into {constants.HF_HUB_CACHE}"
    )


def clip_download_command(folder: str) -> str:
    return f"hf download {DEFAULT_CLIP} --local-dir {folder}"
