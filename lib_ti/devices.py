"""Where a run computes and in which dtypes: the one place that turns "auto"/"cuda:1"/"bf16" into torch objects."""

from __future__ import annotations

import torch

from .errors import TIError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_device(spec: str = "auto") -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU; anything else must name a usable device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise TIError(f"device {spec!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TIError(f"device {spec!r}: this machine has no CUDA GPU that torch can use; use cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise TIError(f"device {spec!r}: there is no GPU {device.index} (found {count}); use cuda:0 to "
                          f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise TIError(f"device {spec!r}: this machine has no Apple GPU that torch can use; use cpu (or auto)")
    elif device.type not in ("cpu", "mps"):
        raise TIError(f"device {spec!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def weights_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: ``auto`` is fp16 on a GPU (half the memory and bandwidth) and fp32 on the CPU."""
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a run; float32 means autocast is off."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU autocast is slower than fp32 for these models
    return DTYPES[precision]
