"""A small CNN that names the shape, its colour and the background of a 64x64 image.

It scores renders, so it is trained on generator images made harder than the generator makes
them (blur, noise, colour shifts, like a soft render), never on renders: a judge trained on the
model's own output would learn its mistakes.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TIError
from ..fileio import atomic_path
from .optim import warmup_cosine
from .shapes import COLOUR_NAMES, SHAPES, Scene, draw, random_scene

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "background": COLOUR_NAMES}


class ShapeClassifier(nn.Module):
    """Four stride-2 convolutions (64 -> 4 pixels), then one linear layer per question.

    Batch norm: without it the same number of steps leaves shapes at ~80% accuracy.
    """

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 64), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(64, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels``: [B, 3, 64, 64] in [-1, 1] -> logits per head."""
        h = self.features(pixels)
        return {name: head(h) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Prediction:
    shape: str
    colour: str
    background: str


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 2e-3
    max_blur: float = 2.5  # pixels (Gaussian sigma): renders through the 8x VAE are about this soft
    round_trip_share: float = 0.5  # of each batch, drawn from generator images passed through the VAE
    round_trip_pool: int = 4000  # how many such images (decoded once, before training)
    seed: int = 0


# ---------------------------------------------------------------------- data
def to_pixels(images: Sequence) -> torch.Tensor:
    """PIL images -> float [B, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def label_tensors(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Each head's class indices for ``scenes``."""
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in HEADS.items()}


def labelled_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Scene]]:
    scenes = [random_scene(rng) for _ in range(n)]
    labels = label_tensors(scenes)
    return to_pixels([draw(s) for s in scenes]), labels, scenes


def roughen(pixels: torch.Tensor, generator: torch.Generator, max_blur: float) -> torch.Tensor:
    """Blur, shift colours and add noise per image, so soft or slightly off-colour renders still classify."""
    n = pixels.shape[0]
    sigma = torch.rand(n, generator=generator) * max_blur
    out = torch.stack([_blur(p, float(s)) for p, s in zip(pixels, sigma, strict=True)])
    out = out + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.2
    out = out + torch.randn(out.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.1
    return out.clamp(-1, 1)


_BLUR_RADIUS = 6  # kernel half-width: 2.4 sigma of the strongest blur


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return image
    x = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=torch.float32)
    kernel = torch.exp(-x.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels, size = image.shape[0], 2 * _BLUR_RADIUS + 1
    horizontal = kernel.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
    padded = F.pad(image[None], (_BLUR_RADIUS,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)[0]


@dataclass(frozen=True)
class RoundTrips:
    """Generator images after the VAE's encode and decode, with their true labels.

    Every render comes out of the VAE decoder, which softens corners and pulls some colours together
    (white comes back a little pink, pink a little pale). A judge that never saw that calls a fine
    white star pink; one shown true scenes through the VAE learns what the decoder can draw, while
    its labels still come from the generator, never from the diffusion model.
    """

    pixels: torch.Tensor  # [N, 3, 64, 64] in [-1, 1]
    labels: dict[str, torch.Tensor]

    def mixed_into(self, pixels: torch.Tensor, labels: dict[str, torch.Tensor], n: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = torch.randint(0, self.pixels.shape[0], (n,), generator=generator)
        return (torch.cat([pixels, self.pixels[index]]),
                {name: torch.cat([labels[name], self.labels[name][index]]) for name in HEADS})


@torch.no_grad()
def vae_round_trips(vae, scenes: Sequence[Scene], latent_means: torch.Tensor, scaling: float,
                    batch: int = 64) -> RoundTrips:
    """Decode the (scaled) latent means of ``scenes``: what the VAE makes of the true images."""
    decoded = [vae.decode(latent_means[i:i + batch] / scaling).sample.clamp(-1, 1)
               for i in range(0, len(scenes), batch)]
    labels = label_tensors(scenes)
    return RoundTrips(torch.cat(decoded), labels)


# ---------------------------------------------------------------------- training and use
def train_classifier(cfg: ClassifierConfig, progress=None, round_trips: RoundTrips | None = None) -> ShapeClassifier:
    """Train on fresh generator images (never the same image twice), and on ``round_trips`` when given;
    deterministic given ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, cfg.steps // 10, cfg.steps)
    rng = random.Random(f"classifier-{cfg.seed}")
    generator = torch.Generator().manual_seed(cfg.seed)
    n_round_trips = round(cfg.batch_size * cfg.round_trip_share) if round_trips is not None else 0
    for _ in range(cfg.steps):
        pixels, labels, _ = labelled_batch(rng, cfg.batch_size - n_round_trips)
        if n_round_trips and round_trips is not None:
            pixels, labels = round_trips.mixed_into(pixels, labels, n_round_trips, generator)
        logits = model(roughen(pixels, generator, cfg.max_blur))
        loss = functools.reduce(operator.add, [F.cross_entropy(logits[name], labels[name]) for name in HEADS])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(float(loss))
    return model.eval()


@torch.no_grad()
def classify(model: ShapeClassifier, images: Sequence) -> list[Prediction]:
    """What ``model`` sees in each PIL image (64x64; other sizes are resized)."""
    if not images:
        return []
    sized = [im if im.size == (64, 64) else im.resize((64, 64)) for im in images]
    logits = model(to_pixels(sized))
    picks = {name: logits[name].argmax(dim=1).tolist() for name in HEADS}
    return [Prediction(*(HEADS[name][picks[name][i]] for name in HEADS)) for i in range(len(images))]


def accuracy_on_fresh_images(model: ShapeClassifier, n: int, seed: int) -> dict[str, float]:
    """Accuracy per head on ``n`` clean generator images never used in training (a separate seed stream)."""
    rng = random.Random(f"classifier-test-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    return _accuracy(classify(model, [draw(s) for s in scenes]), scenes)


@torch.no_grad()
def accuracy_on_round_trips(model: ShapeClassifier, vae, n: int, seed: int) -> dict[str, float]:
    """Accuracy per head on ``n`` fresh generator images passed through ``vae`` (encode, decode): how well it
    judges what the decoder draws, short of judging renders themselves."""
    pixels, _, scenes = labelled_batch(random.Random(f"classifier-round-trip-test-{seed}"), n)
    means = torch.cat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, n, 64)])
    pixels = vae_round_trips(vae, scenes, means, 1.0).pixels
    predictions = classify(model, [to_image(p) for p in pixels])
    return _accuracy(predictions, scenes)


def _accuracy(predictions: Sequence[Prediction], scenes: Sequence[Scene]) -> dict[str, float]:
    return {
        name: sum(getattr(p, name) == getattr(s, name) for p, s in zip(predictions, scenes, strict=True)) / len(scenes)
        for name in HEADS
    }


def to_image(pixels: torch.Tensor):
    """[3, H, W] in [-1, 1] -> a PIL image (what a render is)."""
    from PIL import Image

    array = ((pixels.permute(1, 2, 0).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def save_classifier(model: ShapeClassifier, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"labels": json.dumps(HEADS)})


def load_classifier(path: str | Path) -> ShapeClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TIError(f"classifier {str(path)!r} does not exist; rebuild the micro model with "
                      "`python -m lib_ti.micro.pretrain`")
    with safe_open(str(path), framework="pt") as f:
        labels = json.loads((f.metadata() or {}).get("labels", "null"))
    if labels != {k: list(v) for k, v in HEADS.items()}:
        raise TIError(f"classifier {str(path)!r} was trained for other labels ({labels}); rebuild it with "
                      "`python -m lib_ti.micro.pretrain`")
    model = ShapeClassifier()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval()
