"""Where a run computes and in which dtypes: the one place that turns "auto"/"cuda:1"/"bf16" into torch objects."""

from __future__ import annotations

import platform

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


def weights_dtype(spec: str, device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the headless engine loads the frozen weights in: ``auto`` follows the run's ``precision``
    (bf16 runs load bf16 weights, fp32 runs fp32 ones: never weights that autocast re-casts every step)."""
    if spec == "auto":
        return autocast_dtype(precision, device)
    return DTYPES[spec]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a run (float32 means autocast is off); refuses a dtype the device cannot do."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU: fp32 unless asked (bf16 runs only where the CPU has it: cpu_has_bf16)
    if precision == "bf16":
        check_bf16(device)
    return DTYPES[precision]


def check_bf16(device: torch.device) -> None:
    """Refuse bf16 where the device has no bfloat16 arithmetic of its own (it would be emulated, slower
    than fp32)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TIError(f"precision bf16: the GPU {torch.cuda.get_device_name(device)!r} has no bfloat16 support; "
                      "use precision fp16 (or auto)")
    if device.type == "cpu" and not cpu_has_bf16():
        raise TIError("precision bf16: this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX), so bf16 would "
                      "be slower than fp32 here; use precision fp32 (or auto)")


def cpu_has_bf16() -> bool:
    """x86: AVX-512 BF16 or AMX; other CPUs (ARM, Apple): assumed, torch gives no portable test."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)
