"""Latents are encoded once per sample and kept (on the training device, optionally also on disk).

The VAE encoder costs more than the whole UNet forward pass, so re-encoding every step would
waste most of a step. We keep the latent distribution's mean and std, so "random" sampling (a
fresh draw each step, as when encoding every step) stays cheap. With aspect-ratio buckets samples
differ in size, so latents are kept as one tensor per size; a batch always comes from one of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import TIError, warn
from .fileio import load_torch, save_torch

ENCODE_BATCH = 4  # images per VAE call while caching: bounded memory, still batched


class LatentCache:
    """Latent mean and std (and alpha weights) of every sample, one tensor per sample size.

    ``groups[g]`` holds the samples ``members[g]`` (sample indices, in order); without buckets
    there is exactly one group holding every sample.
    """

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], members: list[list[int]],
                 mode: str, seed: int) -> None:
        self.mode = mode
        self.slots = {i: (g, row) for g, rows in enumerate(members) for row, i in enumerate(rows)}
        generator = torch.Generator().manual_seed(seed)
        self.groups = [self._fixed(mean, std, weights, generator) for mean, std, weights in groups]

    def _fixed(self, mean: torch.Tensor, std: torch.Tensor, weights, generator: torch.Generator):
        if self.mode == "once":  # one fixed draw per sample, like the webui's "once"
            noise = torch.randn(mean.shape, generator=generator).to(mean.device)
            return mean + std * noise, torch.zeros_like(std), weights
        return mean, std, weights

    @classmethod
    def build(cls, engine, samples: Sequence, cfg, run_dir: Path) -> LatentCache:
        members = _members_by_size(samples)
        disk = Path(run_dir) / f"latents-{_cache_key(engine, samples, cfg)}.pt" if cfg.cache_latents_to_disk else None
        cached = _read_cache(disk, members) if disk is not None and disk.is_file() else None
        if cached is not None:
            means, stds = cached
        else:
            encoded = [_encode_all(engine, [samples[i] for i in rows]) for rows in members]
            means, stds = [m for m, _ in encoded], [s for _, s in encoded]
            if disk is not None:
                save_torch({"mean": means, "std": stds}, disk)
        device = engine.device
        groups = []
        for rows, mean, std in zip(members, means, stds, strict=True):
            weights = _latent_weights([samples[i] for i in rows], mean.shape[-2:]) if cfg.use_alpha_weight else None
            groups.append((mean.to(device), std.to(device), None if weights is None else weights.to(device)))
        return cls(groups, members, cfg.latent_sampling, cfg.seed)

    def batch(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        group = {self.slots[i][0] for i in indices}
        if len(group) != 1:
            raise TIError(f"a batch mixes latent sizes (samples {indices}): with buckets, each batch must come from "
                          "one bucket (BucketSampler)")
        mean, std, weights = self.groups[group.pop()]
        index = torch.tensor([self.slots[i][1] for i in indices], dtype=torch.long, device=mean.device)
        picked = mean[index]
        if self.mode == "random":
            noise = torch.randn(picked.shape, generator=generator).to(mean.device)
            picked = picked + std[index] * noise
        return picked, None if weights is None else weights[index]

    def size_groups(self, indices: Sequence[int]) -> list[list[int]]:
        """``indices`` split into lists of one latent size each, in order of first appearance."""
        out: dict[int, list[int]] = {}
        for i in indices:
            out.setdefault(self.slots[i][0], []).append(i)
        return list(out.values())


def _members_by_size(samples: Sequence) -> list[list[int]]:
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault(tuple(s.pixels.shape[-2:]), []).append(i)
    return list(by_size.values())


def _read_cache(path: Path, members: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The cached latents, or None (and a warning) when the file is damaged: they are encoded again."""
    try:
        data = load_torch(path)
        means, stds = _as_list(data["mean"]), _as_list(data["std"])
        if [len(m) for m in means] != [len(rows) for rows in members] or len(stds) != len(means):
            raise ValueError("sizes differ")
    except Exception:  # any way of being damaged; never loaded as code (weights_only)
        warn(f"latent cache {str(path)!r} cannot be read (damaged?): encoding the images again")
        return None
    return means, stds


def _as_list(value) -> list[torch.Tensor]:
    """Cache files hold one tensor per size; files written before buckets hold one tensor."""
    return [value] if isinstance(value, torch.Tensor) else list(value)


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
    if cfg.buckets:
        digest.update(f"|buckets={cfg.bucket_list}".encode())
    for s in samples:
        stat = Path(s.source).stat()
        digest.update(f"|{s.source}|{stat.st_size}|{stat.st_mtime_ns}|{s.flipped}|{s.crop_index}".encode())
    return digest.hexdigest()[:16]
