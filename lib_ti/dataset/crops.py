"""Where to cut an image: cover crops, crops around the subject, and overlapping tiles.

Every function returns boxes in source pixels, ``(x0, y0, x1, y1)`` floats, for
``Image.resize(size, box=box)``: one resampling step from the original, never a crop of a crop.

The subject-aware crop needs no model weights. It scores each pixel by edges (gradient
magnitude) plus spectral-residual saliency (Hou & Zhang, CVPR 2007), adds detected faces when
OpenCV and its bundled Haar cascade happen to be installed, and slides the crop window to where
the score inside it is highest. Plain backgrounds score low, so the window moves to the subject.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..buckets import Size
from ..images import Box

_SCORE_SIDE = 128  # the score map's longer side: position accuracy of ~1% is plenty for a crop


def cover_box(size: Size, target: Size, focus: tuple[float, float] | None = None) -> Box:
    """The largest box of ``target``'s aspect inside an image of ``size``, centred on ``focus``
    (default: the image centre) as far as the image edges allow."""
    src_w, src_h = size
    scale = max(target[0] / src_w, target[1] / src_h)
    box_w, box_h = min(target[0] / scale, src_w), min(target[1] / scale, src_h)
    fx, fy = focus if focus is not None else (src_w / 2, src_h / 2)
    x0 = min(max(fx - box_w / 2, 0.0), src_w - box_w)
    y0 = min(max(fy - box_h / 2, 0.0), src_h - box_h)
    return x0, y0, x0 + box_w, y0 + box_h


def is_oversized(size: Size, target: Size, threshold: float) -> bool:
    """True when the image is more than ``1 + threshold`` times longer than ``target``'s aspect allows
    (in either direction), so that one crop would throw most of it away."""
    ratio = (size[0] * target[1]) / (size[1] * target[0])
    return max(ratio, 1 / ratio) > 1 + threshold


def tile_boxes(size: Size, target: Size, overlap: float) -> list[Box]:
    """Boxes of ``target``'s aspect that cover the image along its long axis, neighbours sharing
    about ``overlap`` of a tile (the webui's "split oversized images", same tile count)."""
    wide = size[0] * target[1] >= size[1] * target[0]
    # Work on (along, across) so that one formula serves wide and tall images.
    along, across = (size[0], size[1]) if wide else (size[1], size[0])
    t_along, t_across = (target[0], target[1]) if wide else (target[1], target[0])
    tile = across * t_along / t_across
    count = max(1, math.ceil((along - tile * overlap) / (tile * (1 - overlap))))
    step = (along - tile) / (count - 1) if count > 1 else 0.0
    starts = [i * step for i in range(count)]
    if wide:
        return [(s, 0.0, s + tile, float(size[1])) for s in starts]
    return [(0.0, s, float(size[0]), s + tile) for s in starts]


def subject_box(image: Image.Image, target: Size) -> Box:
    """The ``target``-aspect cover box placed where the image has the most detail (see module doc)."""
    box = cover_box(image.size, target)
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    if image.width - box_w < 1 and image.height - box_h < 1:
        return box  # the image already has the target's aspect: nothing to move
    score = interest_map(image)
    scale = score.shape[1] / image.width
    win_w, win_h = max(1, round(box_w * scale)), max(1, round(box_h * scale))
    sums = _window_sums(score, win_w, win_h)
    ys, xs = np.mgrid[0:sums.shape[0], 0:sums.shape[1]]
    # A faint pull to the centre decides between equally good places (e.g. a plain image).
    centre = np.hypot(xs - (sums.shape[1] - 1) / 2, ys - (sums.shape[0] - 1) / 2)
    best = np.unravel_index(np.argmax(sums - 1e-6 * (sums.max() or 1.0) * centre), sums.shape)
    fx, fy = float(best[1] + win_w / 2) / scale, float(best[0] + win_h / 2) / scale
    return cover_box(image.size, target, focus=(fx, fy))


def interest_map(image: Image.Image) -> np.ndarray:
    """Per-pixel interest (edges + saliency + faces), each part scaled to [0, 1], on a small grid."""
    small = image.convert("L")
    small.thumbnail((_SCORE_SIDE, _SCORE_SIDE))
    gray = np.asarray(small, dtype=np.float64) / 255.0
    score = _normalised(_edges(gray)) + _normalised(_saliency(gray))
    for x0, y0, x1, y1 in _faces(small):
        score[y0:y1, x0:x1] += 2.0  # a face outweighs any texture: it is what a portrait crop must keep
    return score


def _edges(gray: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(gray)
    return np.hypot(gx, gy)


def _saliency(gray: np.ndarray) -> np.ndarray:
    """Spectral residual: what is left of the log spectrum after removing its smooth trend is what stands out."""
    if gray.std() < 1e-3:  # a flat image has no residual; the transform would put a spurious peak at (0, 0)
        return np.zeros_like(gray)
    spectrum = np.fft.fft2(gray)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - _box_blur(log_amp, 1)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    return _box_blur(saliency, max(1, min(gray.shape) // 32))


def _faces(gray: Image.Image) -> list[tuple[int, int, int, int]]:
    """Face boxes from OpenCV's bundled Haar cascade; [] when OpenCV is absent (it is optional)."""
    try:
        import cv2  # noqa: PLC0415 - optional; never a requirement

        cascade = cv2.CascadeClassifier(f"{cv2.data.haarcascades}haarcascade_frontalface_default.xml")
        if cascade.empty():
            return []
        found = cascade.detectMultiScale(np.asarray(gray), scaleFactor=1.1, minNeighbors=5, minSize=(12, 12))
    except Exception:  # no cv2, no cascade file, or a cv2 build without it: crop without faces
        return []
    return [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in found]


def _normalised(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 1e-12 else np.zeros_like(a)


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row and column in front: any box sum is four lookups."""
    return np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)


def _window_sums(a: np.ndarray, win_w: int, win_h: int) -> np.ndarray:
    """Sum of ``a`` in every ``win_w`` x ``win_h`` window that fits, indexed by its top-left corner."""
    s = _integral(a)
    win_h, win_w = min(win_h, a.shape[0]), min(win_w, a.shape[1])
    return s[win_h:, win_w:] - s[:-win_h, win_w:] - s[win_h:, :-win_w] + s[:-win_h, :-win_w]


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 square, edges repeated: enough smoothing for a score map."""
    k = 2 * radius + 1
    padded = np.pad(a, radius, mode="edge")
    return _window_sums(padded, k, k) / (k * k)
