"""BLIP image captioning through transformers, from local files only.

``load_blip(model)`` takes a local model folder or a model id already in the Hugging Face cache;
nothing is downloaded at run time. When neither exists the error says what is missing, where it
was looked for, and the one command that fetches it on a machine with internet.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import TIError
from ..libraries import quiet_libraries

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"


class BlipCaptioner:
    """``captioner(images) -> captions``: one batched ``generate`` call per list of images."""

    def __init__(self, model, processor, *, max_new_tokens: int = 40, num_beams: int = 3) -> None:
        self.model, self.processor = model, processor
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.no_grad():
            ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def load_blip(model: str = DEFAULT_MODEL, *, device: str = "cpu", max_new_tokens: int = 40,
              num_beams: int = 3) -> BlipCaptioner:
    """A BLIP captioner from a local folder or a cached model id (fp16 on a GPU, fp32 on the CPU)."""
    import torch

    source = locate(model)
    from transformers import BlipForConditionalGeneration, BlipProcessor

    quiet_libraries()
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        processor = BlipProcessor.from_pretrained(source, local_files_only=True)
        net = BlipForConditionalGeneration.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TIError(f"BLIP model {model!r} could not be loaded from {source}: {e}. A BLIP captioning model folder "
                      f"holds config.json, the weights and the processor files, as `{download_command('DIR')}` "
                      "writes them") from None
    net = net.to(device=device, dtype=dtype).eval()
    return BlipCaptioner(net, processor, max_new_tokens=max_new_tokens, num_beams=num_beams)


def locate(model: str) -> str:
    """``model`` if it is a local folder or a model id in the local Hugging Face cache; else a TIError
    saying what is missing and how to get it."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise TIError(f"BLIP model {model!r} is a file; give the model's folder (config.json, weights, processor "
                      "files)")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid model id either (e.g. "./models/blip" that does not exist)
        cached = None
    if isinstance(cached, str):
        return model
    raise TIError(
        f"no BLIP captioning model {model!r}: there is no such folder, and no model id {model!r} in the local Hugging "
        f"Face cache ({constants.HF_HUB_CACHE}). Nothing is downloaded at run time. On a machine with internet run "
        f"`{download_command('models/blip-base')}` (with an older huggingface_hub: `huggingface-cli download ...`, "
        "same arguments), copy that folder here and pass it as the model (--model models/blip-base), or copy that "
        f"machine's Hugging Face cache into {constants.HF_HUB_CACHE}"
    )


def download_command(folder: str) -> str:
    return f"hf download {DEFAULT_MODEL} --local-dir {folder}"
