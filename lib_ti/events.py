"""What the training loop reports. A UI, a progress bar or a log consumes these; the loop has no UI code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Started:
    start_step: int  # > 0 when resuming
    total_steps: int
    num_images: int
    num_samples: int  # images x flips x crops: what the latent cache holds
    notes: list[str] = field(default_factory=list)  # decisions the user should know about
    seconds_to_ready: float = 0.0  # data loading + latent caching


@dataclass
class Step:
    step: int  # optimizer steps done
    total_steps: int
    loss: float | None  # mean loss since the last log point; None between log points
    lr: float
    images_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class Saved:
    step: int
    path: Path  # the final embedding file when is_final, else the checkpoint
    is_final: bool = False
    checkpoint: Path | None = None  # this step's checkpoint embedding in the run's checkpoints/ (final saves too)
    lora: Path | None = None  # pivotal runs: the LoRA saved with it (the final one when is_final)


@dataclass
class Preview:
    step: int
    path: Path
    image: Any  # PIL.Image


@dataclass
class Warning:  # noqa: A001 - an event name, not the builtin
    step: int
    message: str


@dataclass
class Result:
    steps_done: int
    final_path: Path | None
    last_loss: float | None
    stopped_early: bool
    reason: str  # one sentence: why training ended
    skipped_steps: int = 0  # non-finite loss or gradients
    lora_path: Path | None = None  # pivotal runs: the final LoRA
