"""The model families a Textual Inversion embedding can belong to: the one place that names them.

An embedding holds one vector table per text encoder, keyed by the encoder:

* SD1.x  -> ``clip_l`` (OpenAI CLIP ViT-L, 768 wide on real models)
* SD2.x  -> ``clip_h`` (OpenCLIP ViT-H, 1024 wide)
* SDXL   -> ``clip_l`` (768) and ``clip_g`` (OpenCLIP ViT-bigG, 1280)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # "sd1": what configs, files and messages say
    label: str  # "SD1.x": what a user reads
    encoders: tuple[str, ...]  # embedding keys, in the order of the model's text encoders
    widths: tuple[int, ...]  # the real models' encoder widths, in the same order
    resolution: int  # the size the family's base models were trained at (SD2: the 768-v model)
    params_m: dict[str, int]  # parameters in millions, from the public configs (models/real.py builds them)

    @property
    def real_widths(self) -> dict[str, int]:
        return dict(zip(self.encoders, self.widths, strict=True))


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", ("clip_l",), (768,), 512, {"unet": 860, "text": 123, "vae": 84}),
    "sd2": Family("sd2", "SD2.x", ("clip_h",), (1024,), 768, {"unet": 866, "text": 354, "vae": 84}),
    "sdxl": Family("sdxl", "SDXL", ("clip_l", "clip_g"), (768, 1280), 1024, {"unet": 2567, "text": 817, "vae": 84}),
}
NAMES = tuple(FAMILIES)
ENCODER_KEYS = ("clip_l", "clip_h", "clip_g")  # every key an embedding file of ours may hold
SDXL_KEYS = FAMILIES["sdxl"].encoders


def label_of_widths(widths: dict[str, int]) -> str:
    """The family a real model with these encoder widths belongs to ("SD1.x", ...), or "unknown"."""
    for family in FAMILIES.values():
        if widths == family.real_widths:
            return family.label
    return "unknown"


def encoder_key(family: str) -> str:
    """The key of a one-encoder family's vectors (SD1: clip_l, SD2: clip_h)."""
    (key,) = FAMILIES[family].encoders
    return key
