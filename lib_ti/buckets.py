"""Aspect-ratio buckets: train each image near its own aspect instead of squashing or cropping it.

A bucket is a (width, height) pair, both multiples of 64, whose area is at most the training area
(config width x height): memory stays what the plain size needs. An image goes to the bucket
nearest its own aspect, compared in log space so that 2:1 and 1:2 are equally far from 1:1.
Pure arithmetic, no torch: the config validates with it and the pre-flight check reports with it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from .errors import TIError
from .options import bad

STEP = 64  # 8 latent pixels: every UNet (SD1/SD2/SDXL) halves its input up to 3 times

Size = tuple[int, int]  # (width, height)


MAX_SIDE = 4096  # pixels: twice SDXL's largest training size; more would exhaust memory after the model loads


def check_side(owner: str, name: str, value: int, *, zero_ok: bool = False) -> None:
    """A training or output side: a multiple of 8 (the VAE downsamples by 8) from 64 to ``MAX_SIDE``; 0 if
    ``zero_ok``."""
    if zero_ok and value == 0:
        return
    if value < 64 or value > MAX_SIDE or value % 8:
        bad(owner, name, value, ("use 0 (the training size) or " if zero_ok else "use ")
            + f"a multiple of 8 from 64 to {MAX_SIDE} (the VAE downsamples by 8)")


def check_bucket_sides(owner: str, min_side: int, max_side: int) -> None:
    """Bucket side limits: 0 (automatic) or multiples of 64, the longest at least the shortest."""
    for name, value in (("bucket_min_side", min_side), ("bucket_max_side", max_side)):
        if value and (value < STEP or value > 2 * MAX_SIDE or value % STEP):
            bad(owner, name, value, f"use 0 (automatic) or a multiple of {STEP} up to {2 * MAX_SIDE} (the UNet needs "
                "latents divisible by 8)")
    if min_side and max_side and max_side < min_side:
        bad(owner, "bucket_max_side", max_side, f"use at least bucket_min_side={min_side}")


def side_limits(width: int, height: int, min_side: int = 0, max_side: int = 0) -> tuple[int, int]:
    """Bucket side limits; 0 means automatic: half the shorter / twice the longer training side."""
    low = min_side or max(STEP, min(width, height) // 2 // STEP * STEP)
    high = max_side or max(low, 2 * max(width, height) // STEP * STEP)
    return low, high


def bucket_sizes(width: int, height: int, min_side: int = 0, max_side: int = 0) -> list[Size]:
    """Every bucket for a ``width`` x ``height`` training area, tallest first, widest last.

    For each width from ``min_side`` to ``max_side`` (steps of 64) the height is the largest
    multiple of 64 that keeps the area within the training area, so no bucket costs more memory
    than the plain training size; each size is mirrored, so tall images get the choices wide ones do.
    """
    low, high = side_limits(width, height, min_side, max_side)
    area = width * height
    wide = [(w, min(high, area // w // STEP * STEP)) for w in range(low, high + 1, STEP)]
    wide = [(w, h) for w, h in wide if h >= low]
    sizes = sorted(set(wide) | {(h, w) for w, h in wide}, key=lambda s: (s[0] / s[1], s))
    if not sizes:
        raise TIError(f"no bucket with sides between {low} and {high} (multiples of {STEP}) fits the training area "
                      f"{width}x{height}: lower bucket_min_side or raise width/height")
    return sizes


def nearest_bucket(size: Size, buckets: Iterable[Size]) -> Size:
    """The bucket whose aspect is nearest ``size``'s; on a tie the larger one (less upscaling)."""
    aspect = math.log(max(size[0], 1) / max(size[1], 1))
    return min(buckets, key=lambda b: (abs(aspect - math.log(b[0] / b[1])), -b[0] * b[1]))


def assign(sizes: Iterable[Size], buckets: Iterable[Size]) -> Counter:
    """How many of ``sizes`` land in each bucket: ``Counter({(w, h): n})``."""
    options = list(buckets)
    return Counter(nearest_bucket(s, options) for s in sizes)


def describe(counts: Counter) -> str:
    """``"384x640 x5, 512x512 x4"``: buckets by size, for reports."""
    return ", ".join(f"{w}x{h} x{n}" for (w, h), n in sorted(counts.items()))
