"""Checkpoints of a run: the embedding (usable at once in a prompt) plus the state to resume it.

``checkpoints/<name>-<step>.<ext>`` is an ordinary embedding file; ``<name>-<step>.state.pt`` beside
it holds the optimizer and scaler state, every vector (trained or not) and the config; a pivotal run
also writes ``<name>-<step>-lora.safetensors`` (a kohya LoRA any webui loads) and keeps the adapters'
weights in the state. Resume needs nothing else, because the data order, noise, timesteps and dropout
are pure functions of (seed, step).

A checkpoint exists when its state file does: the embedding is written first and the state last,
and deleted the other way round, so a crash in between leaves at most an orphan embedding, which
``remove_orphans`` sweeps at the next start of the run.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .embedding import Embedding
from .errors import TIError, shown
from .fileio import fault_point, load_torch, save_torch
from .formats.embeddings import save_embedding
from .formats.lora import LoraModule, save_lora

STATE_VERSION = 1


@dataclass
class TrainingState:
    step: int
    vectors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    config: dict[str, Any]
    pending_losses: list[float]  # losses since the last loss.csv row, so the resumed log matches
    lora: dict[str, dict[str, Any]] | None = None  # pivotal runs: kohya name -> {"down", "up", "alpha"}

    @property
    def lora_weights(self) -> dict[str, LoraModule] | None:
        if self.lora is None:
            return None
        return {name: LoraModule(w["down"], w["up"], float(w["alpha"])) for name, w in self.lora.items()}

    @staticmethod
    def lora_payload(weights: dict[str, LoraModule]) -> dict[str, dict[str, Any]]:
        return {name: {"down": w.down, "up": w.up, "alpha": float(w.alpha)} for name, w in weights.items()}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, name: str, step: int, fmt: str) -> Path:
    """The embedding file of ``name``'s checkpoint at ``step`` (its state file lies beside it)."""
    return checkpoint_dir(run_dir) / f"{name}-{step}.{fmt}"


def state_path(run_dir: Path, name: str, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{name}-{step}.state.pt"


def lora_checkpoint_path(run_dir: Path, name: str, step: int) -> Path:
    """The LoRA file of a pivotal run's checkpoint at ``step``."""
    return checkpoint_dir(run_dir) / f"{name}-{step}{LORA_SUFFIX}"


def final_lora_path(run_dir: Path, name: str) -> Path:
    """A pivotal run's final LoRA, beside its final embedding: prompted as ``<lora:<name>-lora:1>``."""
    return Path(run_dir) / f"{name}{LORA_SUFFIX}"


LORA_SUFFIX = "-lora.safetensors"


def save_checkpoint(run_dir: Path, emb: Embedding, state: TrainingState, fmt: str, keep_last: int,
                    lora_metadata: dict[str, str] | None = None) -> Path:
    """Write the embedding (and the LoRA) and the state atomically, then prune old checkpoints. Returns the
    embedding path. The state goes last: a checkpoint exists once all its files do."""
    emb_path = save_embedding(emb, checkpoint_path(run_dir, emb.name, state.step, fmt), overwrite=True)
    weights = state.lora_weights
    if weights is not None:
        save_lora(weights, lora_checkpoint_path(run_dir, emb.name, state.step), lora_metadata or {}, overwrite=True)
    fault_point(f"checkpoint {emb.name}-{state.step}")
    payload = {"version": STATE_VERSION, "step": state.step, "vectors": state.vectors, "optimizer": state.optimizer,
               "scaler": state.scaler, "config": state.config, "pending_losses": state.pending_losses,
               "lora": state.lora}
    save_torch(payload, state_path(run_dir, emb.name, state.step))
    if keep_last:
        _prune(checkpoint_dir(run_dir), emb.name, keep_last)
    return emb_path


def list_states(run_dir: Path, name: str) -> list[tuple[int, Path]]:
    """(step, state path) pairs of ``name``'s checkpoints, oldest first."""
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.state\.pt")
    found = []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
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
    step, path = states[-1]
    try:
        return load_state(path)
    except TIError as exc:
        if len(states) < 2:
            raise TIError(f"{exc}. It is the run's only checkpoint: start the run again (allow overwrite)") from None
        earlier = states[-2][0]
        raise TIError(f"{exc}. To resume from the previous checkpoint (step {earlier}) instead, move "
                      f"{name}-{step}.* out of {str(checkpoint_dir(run_dir))!r}, then resume again") from None


def saved_config(run_dir: Path, name: str) -> TrainConfig:
    """The config the run's last checkpoint was trained with: what a resumed run continues with."""
    return TrainConfig.from_dict(load_latest(run_dir, name).config)


_STATE_KEYS = ("step", "vectors", "optimizer", "scaler", "config", "pending_losses")


def load_state(path: Path) -> TrainingState:
    unreadable = (f"checkpoint state {str(path)!r} cannot be read: it is damaged or was not written by this "
                  "trainer (it is only ever loaded as tensors and plain values, never as code)")
    try:
        with warnings.catch_warnings():  # torch warns about pickles it may not read: the message below says it
            warnings.simplefilter("ignore")
            data = load_torch(path)
    except Exception:  # torch's own text would advise loading it as code (weights_only=False): never do that
        raise TIError(unreadable) from None
    if not isinstance(data, dict) or any(key not in data for key in _STATE_KEYS):
        raise TIError(unreadable)
    if data.get("version") != STATE_VERSION:
        raise TIError(f"checkpoint state {str(path)!r} has version {shown(data.get('version'))}, expected "
                      f"{STATE_VERSION}")
    fields = {key: data[key] for key in _STATE_KEYS}
    return TrainingState(**fields, lora=data.get("lora"))  # no "lora": an embedding run


def remove_checkpoint(run_dir: Path, name: str, step: int) -> None:
    """Delete one checkpoint: its state first (it is then no checkpoint any more), its embedding after."""
    state_path(run_dir, name, step).unlink(missing_ok=True)
    fault_point(f"prune {name}-{step}")
    for path in [*checkpoint_dir(run_dir).glob(f"{name}-{step}.*"), lora_checkpoint_path(run_dir, name, step)]:
        path.unlink(missing_ok=True)


def remove_orphans(run_dir: Path, name: str) -> list[Path]:
    """Delete checkpoint embeddings (and LoRAs) of ``name`` that have no state file: what a crash between writing (or
    deleting) the two files leaves. Call it only while holding the run folder's lock."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    steps = {step for step, _ in list_states(run_dir, name)}
    pattern = re.compile(rf"{re.escape(name)}-(\d+)(\.safetensors|\.pt|{re.escape(LORA_SUFFIX)})")
    removed = []
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) not in steps and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _prune(folder: Path, name: str, keep_last: int) -> None:
    for step, _ in list_states(folder.parent, name)[:-keep_last]:
        remove_checkpoint(folder.parent, name, step)
