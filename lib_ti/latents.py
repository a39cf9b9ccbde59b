"""Latents are encoded once per sample and kept (on the training device, optionally also on disk).

The VAE encoder costs more than the whole UNet forward pass, so re-encoding every step would
waste most of a step. We keep the latent distribution's mean and std, so "random" sampling (a
fresh draw each step, as when encoding every step) stays cheap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .fileio import load_torch

ENCODE_BATCH = 4  # images per VAE call while caching: bounded memory, still batched


class LatentCache:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weights: torch.Tensor | None, mode: str, seed: int) -> None:
        self.mean, self.std, self.weights, self.mode = mean, std, weights, mode
        if mode == "once":  # one fixed draw per sample, like the webui's "once"
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)).to(mean.device)
            self.mean, self.std = mean + std * noise, torch.zeros_like(std)

    @classmethod
    def build(cls, engine, samples: Sequence, cfg, run_dir: Path) -> "LatentCache":
        disk = Path(run_dir) / f"latents-{_cache_key(engine, samples, cfg)}.pt" if cfg.cache_latents_to_disk else None
        if disk is not None and disk.is_file():
            data = load_torch(disk)
            mean, std = data["mean"], data["std"]
        else:
            mean, std = _encode_all(engine, samples)
            if disk is not None:
                from .fileio import atomic_path

                with atomic_path(disk) as tmp:
                    torch.save({"mean": mean.cpu(), "std": std.cpu()}, tmp)
        weights = _latent_weights(samples, mean.shape[-2:]) if cfg.use_alpha_weight else None
        device = engine.device
        return cls(mean.to(device), std.to(device), None if weights is None else weights.to(device),
                   cfg.latent_sampling, cfg.seed)

    def batch(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.tensor(indices, dtype=torch.long, device=self.mean.device)
        mean = self.mean[index]
        if self.mode == "random":
            noise = torch.randn(mean.shape, generator=generator).to(mean.device)
            mean = mean + self.std[index] * noise
        weights = None if self.weights is None else self.weights[index]
        return mean, weights


def _encode_all(engine, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(samples), ENCODE_BATCH):
        pixels = torch.stack([s.pixels for s in samples[start:start + ENCODE_BATCH]])
        mean, std = engine.encode_images(pixels)
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _latent_weights(samples: Sequence, size: torch.Size) -> torch.Tensor:
    """Per-pixel loss weights resized to the latent grid, repeated over the 4 latent channels by broadcasting."""
    out = []
    for s in samples:
        w = s.weight if s.weight is not None else torch.ones(s.pixels.shape[-2:])
        out.append(F.interpolate(w[None, None].float(), size=tuple(size), mode="area")[0])
    return torch.stack(out)  # [N, 1, h, w]


def _cache_key(engine, samples: Sequence, cfg) -> str:
    digest = hashlib.sha256()
    digest.update(f"{engine.checkpoint_hash}|{engine.checkpoint_name}|{cfg.width}x{cfg.height}|{cfg.crop}|{cfg.seed}".encode())
    for s in samples:
        stat = Path(s.source).stat()
        digest.update(f"|{s.source}|{stat.st_size}|{stat.st_mtime_ns}|{s.flipped}|{s.crop_index}".encode())
    return digest.hexdigest()[:16]
