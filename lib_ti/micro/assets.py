"""Where the shipped micro model lives, and a clear error when it is not there."""

from __future__ import annotations

from pathlib import Path

from ..errors import TIError
from .model import NAME

ASSETS = Path(__file__).resolve().parents[1] / "assets" / NAME
REBUILD = "rebuild it with `python -m lib_ti.micro.pretrain --out lib_ti/assets/micro-sd` (about an hour on a CPU)"


def model_folder(root: Path = ASSETS) -> Path:
    """The diffusers folder (``--model`` for every command); also the config folder of the single file."""
    return _existing(root / f"{NAME}.diffusers" / "model_index.json").parent


def single_file(root: Path = ASSETS) -> Path:
    """The webui checkpoint; its ``.yaml`` lies beside it."""
    return _existing(root / f"{NAME}.safetensors")


def classifier_file(root: Path = ASSETS) -> Path:
    return _existing(root / "classifier.safetensors")


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise TIError(f"the micro model file {str(path)!r} is missing; {REBUILD}")
    if path.stat().st_size < 1024 and path.suffix == ".safetensors":  # a Git LFS pointer, not the weights
        raise TIError(f"{str(path)!r} is a {path.stat().st_size}-byte stub, not the weights (a Git LFS pointer?); "
                      f"fetch the real file or {REBUILD}")
    return path
