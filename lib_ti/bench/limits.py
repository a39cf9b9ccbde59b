"""What a training step could cost on this device at best: ``bench speed --limits``.

Two floors for the same step, both from measurements on this machine:

- **peak floor**: the step's FLOPs at the rate of one large square matmul (the usual MFU denominator);
- **shape floor**: each of the step's matrix products (convolutions as the GEMM they lower to, attention
  as its batched products) at the rate this device reaches *for that product's own shape*. At batch 1
  and a small resolution most of the UNet's products have few rows (a 4x4 latent is a 16-row GEMM) and
  run far below the peak on a CPU, which no trainer can change; this floor says how close a step is to
  what its shapes allow.

Only products count (elementwise ops, norms and copies are memory-bound and free in both floors), so
both floors are lower bounds. The counter is our own dispatch mode because torch's FlopCounterMode
does not count the CPU attention kernels.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


@dataclass(frozen=True, order=True)
class Gemm:
    """One matrix product shape: ``batch`` products of [m, k] @ [k, n]."""

    batch: int
    m: int
    k: int
    n: int
    dtype: torch.dtype

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


class GemmCounter(TorchDispatchMode):
    """Records the matrix products the ops under it run, by shape (``self.counts``: Gemm -> calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[Gemm] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.counts.update(gemms_of(func._overloadpacket.__name__, args, out))
        return out

    @property
    def flops(self) -> int:
        return total_flops(self.counts)


def total_flops(counts: collections.Counter[Gemm]) -> int:
    return sum(g.flops * calls for g, calls in counts.items())


def gemms_of(op: str, args, out) -> list[Gemm]:
    """The matrix products of one aten op (empty for ops that run none)."""
    if op in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = args[-2:] if op in ("addmm", "baddbmm") else args[:2]
        batch = a.shape[0] if a.dim() == 3 else 1
        return [Gemm(batch, a.shape[-2], a.shape[-1], b.shape[-1], a.dtype)]
    if op == "convolution":
        return [_conv_gemm(args[0], args[1], out, groups=args[8], transposed=args[6])]
    if op == "convolution_backward":
        grad_out, x, w = args[:3]
        return _conv_backward_gemms(grad_out, x, w, groups=args[9], transposed=args[7], mask=args[10])
    if op == "_slow_conv2d_forward":  # torch's im2col kernel (``layouts.native_small_convs``)
        return [_conv_gemm(args[0], args[1], out, groups=1, transposed=False)]
    if op == "_slow_conv2d_backward":
        grad_out, x, w = args[:3]
        return _conv_backward_gemms(grad_out, x, w, groups=1, transposed=False, mask=args[6])
    if op in _ATTENTION:
        q, k, v = args[:3]
        return _attention_gemms(q, k, v)
    if op.removesuffix("_backward") in _ATTENTION:
        grad_out, q, k, v = args[:4]
        return _attention_backward_gemms(grad_out, q, k, v)
    return []


def _conv_gemm(x, w, out, groups: int, transposed: bool) -> Gemm:
    """A convolution as the GEMM of its im2col form: output pixels x (input channels x kernel) x outputs
    (transposed: input pixels x input channels x (outputs x kernel), then col2im)."""
    area, dtype = w[0, 0].numel(), x.dtype
    if transposed:  # weight [in, out / groups, kh, kw]
        pixels = x.shape[0] * x[0, 0].numel()
        return Gemm(groups, pixels, w.shape[0] // groups, w.shape[1] * area, dtype)
    pixels = out.shape[0] * out[0, 0].numel()
    return Gemm(groups, pixels, w.shape[1] * area, w.shape[0] // groups, dtype)


def _conv_backward_gemms(grad_out, x, w, groups: int, transposed: bool, mask) -> list[Gemm]:
    """The input's grad (the output's grads back through W) and the weight's, each as a GEMM."""
    area, dtype = w[0, 0].numel(), grad_out.dtype
    if transposed:
        pixels, inputs, outputs = x.shape[0] * x[0, 0].numel(), w.shape[0] // groups, w.shape[1] * area
        grad_input = Gemm(groups, pixels, outputs, inputs, dtype)
        grad_weight = Gemm(groups, inputs, pixels, outputs, dtype)
    else:
        pixels, kernel, outputs = grad_out.shape[0] * grad_out[0, 0].numel(), w.shape[1] * area, w.shape[0] // groups
        grad_input = Gemm(groups, pixels, outputs, kernel, dtype)
        grad_weight = Gemm(groups, outputs, pixels, kernel, dtype)
    return [g for g, wanted in ((grad_input, mask[0]), (grad_weight, mask[1])) if wanted]


def _attention_gemms(q, k, v) -> list[Gemm]:
    heads, dtype = q.shape[0] * q.shape[1], q.dtype
    return [Gemm(heads, q.shape[-2], q.shape[-1], k.shape[-2], dtype),  # scores = Q K^T
            Gemm(heads, q.shape[-2], k.shape[-2], v.shape[-1], dtype)]  # out = P V


def _attention_backward_gemms(grad_out, q, k, v) -> list[Gemm]:
    """Flash backward: the scores recomputed, then dP, dV, dQ, dK (as torch's own formula counts it)."""
    heads, dtype = q.shape[0] * q.shape[1], q.dtype
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    return [Gemm(heads, lq, d, lk, dtype), Gemm(heads, lq, dv, lk, dtype), Gemm(heads, lk, lq, dv, dtype),
            Gemm(heads, lq, lk, d, dtype), Gemm(heads, d, lq, lk, dtype)]


# ---------------------------------------------------------------------- rates
def gemm_rate(g: Gemm, device: torch.device, min_s: float = 0.05) -> float:
    """FLOP/s this device reaches for the product ``g`` (repeated for at least ``min_s`` seconds)."""
    shape_a, shape_b = ((g.batch, g.m, g.k), (g.batch, g.k, g.n)) if g.batch > 1 else ((g.m, g.k), (g.k, g.n))
    a = torch.randn(shape_a, device=device).to(g.dtype)
    b = torch.randn(shape_b, device=device).to(g.dtype)
    torch.matmul(a, b)  # warm-up: kernel choice
    _sync(device)
    repeats, t0 = 0, time.perf_counter()
    while repeats < 2 or (time.perf_counter() - t0 < min_s and repeats < 50):
        torch.matmul(a, b)
        _sync(device)
        repeats += 1
    return g.flops * repeats / (time.perf_counter() - t0)


def matmul_peak_tflops(device_name: str, dtype_name: str, size: int = 0) -> float:
    """TFLOP/s of a square matmul in ``dtype`` on ``device``: the peak MFU is measured against."""
    from ..devices import DTYPES, choose_device

    device = choose_device(device_name)
    dtype = DTYPES[dtype_name]
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):  # warm-up: kernel choice, clocks
        a @ b
    _sync(device)
    repeats = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- floors
def floors(counts: collections.Counter[Gemm], device: torch.device, peak_tflops: float) -> dict:
    """The step's FLOPs, both floors (seconds) and the shape floor's share by GEMM row count."""
    rates = {g: gemm_rate(g, device) for g in counts}
    total = total_flops(counts)
    by_rows: dict[int, dict[str, float]] = {}
    for g, calls in counts.items():
        row = by_rows.setdefault(g.m, {"gflop": 0.0, "floor_s": 0.0})
        row["gflop"] += g.flops * calls / 1e9
        row["floor_s"] += g.flops * calls / rates[g]
    return {
        "step_gflop": total / 1e9,
        "peak_tflops": peak_tflops,
        "floor_peak_s": total / (peak_tflops * 1e12),
        "floor_shapes_s": sum(row["floor_s"] for row in by_rows.values()),
        "by_rows": {m: {**row, "gflop_per_s": row["gflop"] / row["floor_s"]}
                    for m, row in sorted(by_rows.items())},
    }


def format_limits(lim: dict, step_s: float) -> list[str]:
    """The report's lines: both floors and how close the measured step (median seconds) comes to each."""
    worst = sorted(lim["by_rows"].items(), key=lambda kv: -kv[1]["floor_s"])[:3]
    shares = "; ".join(f"{m} rows: {row['gflop_per_s']:.0f} GFLOP/s, "
                       f"{100 * row['floor_s'] / lim['floor_shapes_s']:.0f} %" for m, row in worst)
    return [
        f"limits      step {lim['step_gflop']:.3g} GFLOP in matrix products; at the square-matmul peak "
        f"{lim['peak_tflops']:.3g} TFLOP/s: {lim['floor_peak_s']:.3f} s/step (this run "
        f"{100 * lim['floor_peak_s'] / step_s:.0f} %)",
        f"            at the rates this device reaches for the step's own GEMM shapes: "
        f"{lim['floor_shapes_s']:.3f} s/step (this run {100 * lim['floor_shapes_s'] / step_s:.0f} %)",
        f"            where that floor goes (products by row count: rate, share): {shares}",
    ]
