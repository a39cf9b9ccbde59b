"""Frozen weights held in bfloat16 for a run, and put back bit for bit afterwards.

Only the weights of ``nn.Linear`` and ``nn.Conv*`` layers change: they carry the matmul and convolution
work a step spends its time on. Norms and token/position embeddings stay as they were (float32), so the
embedding's vectors splice into tables of their own dtype and normalisation statistics stay float32.

A float32 weight is split in place into two 16-bit halves: the bfloat16 weight the run computes with
(its value rounded to the nearest bfloat16, ties away from zero) and the 16-bit remainder that, added
back to the bfloat16's bit pattern, gives the original float32 bit pattern exactly. The two halves take
the same 4 bytes per value as the float32 weight did, so holding the weights in bfloat16 costs no extra
memory beyond one layer's worth of temporaries while converting, and restoring is exact whatever the
value (NaN payloads, infinities, -0.0 and subnormals included). Weights of another dtype (fp16 on a GPU)
cannot be restored from a bfloat16 copy: their original tensors are kept (their size in extra memory).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator

import torch

from .heap import Trimmer

MATMUL_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


CHUNK = 1 << 22  # values converted at a time: one chunk's int32 scratch (16 MB) is the only temporary


def split_float32(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bfloat16 weight, int16 remainder) of a float32 tensor; ``join_float32`` gives its bits back.

    The bfloat16 is the top half of the float32's bits plus 0x8000 (round to nearest, ties away from
    zero; a carry into the exponent is the right rounding too); the remainder is the float32's bits minus
    the bfloat16's shifted back, which always lies in [-32768, 32767]: it is the low 16 bits read as a
    signed number. int32 arithmetic wraps, so every pattern (NaN, inf, -0.0, subnormals) comes back exactly.
    """
    bits = weight.contiguous().view(-1).view(torch.int32)
    high = torch.empty(bits.shape, dtype=torch.int16, device=bits.device)
    low = torch.empty_like(high)
    scratch = torch.empty(min(CHUNK, bits.numel()), dtype=torch.int32, device=bits.device)
    for start in range(0, bits.numel(), CHUNK):
        part, s = bits[start:start + CHUNK], scratch[:min(CHUNK, bits.numel() - start)]
        torch.add(part, 0x8000, out=s)
        torch.bitwise_right_shift(s, 16, out=s)
        high[start:start + CHUNK].copy_(s)  # within int16 range: an arithmetic shift of an int32 by 16
        low[start:start + CHUNK].copy_(part)  # int32 -> int16 keeps the low 16 bits
    return high.view(torch.bfloat16).view(weight.shape), low.view(weight.shape)


def join_float32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The float32 tensor ``split_float32`` split into ``high`` (bfloat16) and ``low`` (int16)."""
    hi, lo = high.reshape(-1).view(torch.int16), low.reshape(-1)
    out = torch.empty(hi.shape, dtype=torch.int32, device=hi.device)
    for start in range(0, hi.numel(), CHUNK):
        part = out[start:start + CHUNK]
        part.copy_(hi[start:start + CHUNK])  # sign-extended
        torch.bitwise_left_shift(part, 16, out=part)
        part.add_(lo[start:start + CHUNK])
    return out.view(torch.float32).view(high.shape)


def matmul_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The weights and biases of every Linear and Conv layer of ``modules``, each once (tied weights too)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, MATMUL_LAYERS):
                for p in layer.parameters(recurse=False):
                    seen.setdefault(id(p), p)
    return list(seen.values())


@contextlib.contextmanager
def held_in_bf16(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """Inside the block the matmul weights of ``modules`` are bfloat16; afterwards (also after an error)
    every one is bit-identical to before. Yields the number of weights converted."""
    undo: list[tuple[torch.nn.Parameter, torch.Tensor, bool]] = []  # (p, its remainder or its original, split)
    try:
        for p in matmul_parameters(modules):
            if p.dtype == torch.float32:
                high, low = split_float32(p.data)
                p.data = high
                undo.append((p, low, True))
            elif p.dtype != torch.bfloat16 and p.dtype.is_floating_point:
                original = p.data
                p.data = original.to(torch.bfloat16)
                undo.append((p, original, False))
        yield len(undo)
    finally:
        # The bfloat16 half is read back from the parameter, not kept here: a run may hold it in another
        # layout meanwhile (``layouts``), and a reference kept here would keep a second copy alive.
        trimmer = Trimmer()
        while undo:  # popped, so each remainder is freed as soon as its weight is back
            param, kept, split = undo.pop()
            held = param.data.nbytes + (kept.nbytes if split else 0)
            param.data = join_float32(param.data, kept) if split else kept
            del kept
            trimmer.freed(held)
        trimmer.done()


def weights_digest(modules: Iterable[torch.nn.Module]) -> str:
    """A hash of every parameter and buffer of ``modules`` (name, dtype, shape and bits): equal digests
    before and after a run mean the run left the weights bit-identical. About a second per GB on a CPU."""
    digest = hashlib.blake2b(digest_size=16)
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict(keep_vars=True).items():
            t = tensor.detach()
            digest.update(f"{index}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()
