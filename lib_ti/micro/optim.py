"""The learning-rate schedule every micro pretraining stage uses: linear warm-up, then cosine to zero."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Scale each group's learning rate: (step+1)/warmup for ``warmup`` steps, then a cosine down to 0 at ``total``.

    Valid for any lengths (a 2-step test run included), unlike OneCycleLR, which divides by its phase lengths.
    """
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
