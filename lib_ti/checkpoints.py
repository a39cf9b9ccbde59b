"""Checkpoints of a run: the embedding (usable at once in a prompt) plus the state to resume it.

``checkpoints/<name>-<step>.<ext>`` is an ordinary embedding file; ``<name>-<step>.state.pt`` beside
it holds the optimizer and scaler state, every vector (trained or not) and the config. Resume needs
nothing else, because the data order, noise and timesteps are pure functions of (seed, step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .embedding import Embedding
from .errors import TIError
from .fileio import atomic_path, load_torch
from .formats.embeddings import save_embedding

STATE_VERSION = 1


@dataclass
class TrainingState:
    step: int
    vectors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    config: dict[str, Any]
    pending_losses: list[float]  # losses since the last loss.csv row, so the resumed log matches


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, name: str, step: int, fmt: str) -> Path:
    """The embedding file of ``name``'s checkpoint at ``step`` (its state file lies beside it)."""
    return checkpoint_dir(run_dir) / f"{name}-{step}.{fmt}"


def save_checkpoint(run_dir: Path, emb: Embedding, state: TrainingState, fmt: str, keep_last: int) -> Path:
    """Write the embedding and its state atomically, then prune old checkpoints. Returns the embedding path."""
    emb_path = save_embedding(emb, checkpoint_path(run_dir, emb.name, state.step, fmt), overwrite=True)
    payload = {"version": STATE_VERSION, "step": state.step, "vectors": state.vectors, "optimizer": state.optimizer,
               "scaler": state.scaler, "config": state.config, "pending_losses": state.pending_losses}
    with atomic_path(emb_path.with_name(f"{emb.name}-{state.step}.state.pt")) as tmp:
        torch.save(payload, tmp)
    if keep_last:
        _prune(checkpoint_dir(run_dir), emb.name, keep_last)
    return emb_path


def list_states(run_dir: Path, name: str) -> list[tuple[int, Path]]:
    """(step, state path) pairs of ``name``'s checkpoints, oldest first."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)\.state\.pt$")
    found = []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found)


def load_latest(run_dir: Path, name: str) -> TrainingState:
    states = list_states(run_dir, name)
    if not states:
        raise TIError(
            f"nothing to resume: {str(checkpoint_dir(run_dir))!r} has no checkpoint of {name!r}; "
            "start without --resume, or point --output-dir at the run folder"
        )
    return load_state(states[-1][1])


def saved_config(run_dir: Path, name: str) -> TrainConfig:
    """The config the run's last checkpoint was trained with: what a resumed run continues with."""
    return TrainConfig.from_dict(load_latest(run_dir, name).config)


def load_state(path: Path) -> TrainingState:
    try:
        data = load_torch(path)  # never run pickled code
    except Exception as exc:
        raise TIError(f"checkpoint state {str(path)!r} cannot be read ({exc}); resume from an earlier one") from exc
    if data.get("version") != STATE_VERSION:
        raise TIError(f"checkpoint state {str(path)!r} has version {data.get('version')}, expected {STATE_VERSION}")
    return TrainingState(data["step"], data["vectors"], data["optimizer"], data["scaler"], data["config"],
                         data["pending_losses"])


def remove_checkpoint(run_dir: Path, name: str, step: int) -> None:
    """Delete the embedding and state files of one checkpoint."""
    for path in checkpoint_dir(run_dir).glob(f"{name}-{step}.*"):
        path.unlink(missing_ok=True)


def _prune(folder: Path, name: str, keep_last: int) -> None:
    for step, _ in list_states(folder.parent, name)[:-keep_last]:
        remove_checkpoint(folder.parent, name, step)
