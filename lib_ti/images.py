"""Training images: find them, read them robustly, crop/flip them, and order them for training.

``discover`` lists a folder's images and captions, ``load_samples`` turns them into
fixed-size [-1, 1] tensors (plus optional alpha loss weights), and ``SampleSampler``
gives the batch for any step as a pure function of (seed, step), so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
from PIL import Image, ImageOps

from .buckets import nearest_bucket
from .errors import TIError, warn
from .templates import MAX_LINE

if TYPE_CHECKING:  # torch is imported where tensors are made: listing and checking files must stay quick
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CROP_MODES = ("center", "random", "squash")
METADATA_FILE = "metadata.jsonl"
MAX_METADATA_FILE = 64 * 1024 * 1024  # bytes: a caption line per image, for far more images than any dataset

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# What PIL raises for files it cannot decode (truncated, not an image, zero bytes, bad EXIF).
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass
class DatasetOptions:
    width: int = 512
    height: int = 512
    crop: str = "center"  # "center" | "random" | "squash" (resize ignoring aspect, like the webui)
    flip: bool = False  # also train on a horizontally flipped copy of each image
    random_crops: int = 4  # crops per image precomputed when crop == "random"
    repeats: int = 1  # times each image is seen per epoch
    use_alpha_weight: bool = False  # weight the loss by the image's alpha channel
    caption_extension: str = ".txt"
    buckets: tuple[tuple[int, int], ...] = ()  # (width, height) sizes; each image goes to the one nearest its aspect

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            _check_int(name, getattr(self, name), 8)
            if getattr(self, name) % 8:
                raise TIError(f"dataset {name} must be a multiple of 8, got {getattr(self, name)}; try "
                              f"{getattr(self, name) // 8 * 8 or 8}")
        if self.crop not in CROP_MODES:
            raise TIError(f"dataset crop must be one of {list(CROP_MODES)}, got {self.crop!r}")
        for name in ("flip", "use_alpha_weight"):
            if not isinstance(getattr(self, name), bool):
                raise TIError(f"dataset {name} must be True or False, got {getattr(self, name)!r}")
        _check_int("random_crops", self.random_crops, 1)
        _check_int("repeats", self.repeats, 1)
        _check_caption_extension(self.caption_extension)
        for size in self.buckets:
            if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8 for v in size):
                raise TIError(f"dataset bucket {size!r} must be a (width, height) pair of multiples of 8")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TIError(f"dataset {name} must be an integer >= {minimum}, got {value!r}")


def _check_caption_extension(ext: object) -> None:
    if not isinstance(ext, str) or len(ext) < 2 or not ext.startswith(".") or ext.lower() in IMAGE_EXTENSIONS:
        raise TIError(f"caption_extension must look like '.txt' (a dot, then a non-image extension), got {ext!r}")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str | None = None


@dataclass
class Sample:
    pixels: torch.Tensor  # float32 [3, H, W] in [-1, 1]
    weight: torch.Tensor | None  # float32 [H, W], mean 1, or None when alpha weights are off
    caption: str | None
    source: Path
    flipped: bool = False
    crop_index: int = 0
    image_index: int = 0  # which loaded image this is a variant of (0..n_images-1)


# ---------------------------------------------------------------- discovery


def discover(data_dir: str | os.PathLike, *, caption_extension: str = ".txt") -> list[ImageItem]:
    """The images in ``data_dir`` (not recursive, sorted) with their captions.

    A caption comes from ``metadata.jsonl`` (HF imagefolder: ``{"file_name", "text"}``
    per line; may name files in sub-folders) if the folder has one and it lists the
    image, else from ``<stem><caption_extension>`` (UTF-8, stripped), else None.
    """
    _check_caption_extension(caption_extension)
    folder = _check_folder(data_dir)
    meta = _read_metadata(folder / METADATA_FILE) if (folder / METADATA_FILE).is_file() else {}
    paths = {p for p in folder.iterdir() if p.is_file() and _is_image_name(p)} | set(meta)
    if not paths:
        raise TIError(
            f"no image files in {str(folder)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, not in sub-folders); "
            "put the training images directly in that folder"
        )
    ordered = sorted(paths, key=lambda p: p.relative_to(folder).as_posix())
    return [ImageItem(p, meta[p] if meta.get(p) is not None else _read_sidecar(p, caption_extension)) for p in ordered]


def _check_folder(data_dir: str | os.PathLike) -> Path:
    folder = Path(os.path.normpath(Path(data_dir).expanduser()))  # so metadata paths compare equal
    if not folder.exists():
        raise TIError(f"dataset folder {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise TIError(f"dataset path {str(folder)!r} is a file, not a folder; give the folder that holds the images")
    return folder


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _read_sidecar(image: Path, ext: str) -> str | None:
    path = image.with_suffix(ext)
    return read_caption_file(path) if path.is_file() else None


def read_caption_file(path: Path) -> str:
    """A caption file's text, stripped. Errors never quote the file (a webui request may name the folder)."""
    try:
        if path.stat().st_size > 4 * MAX_LINE:  # UTF-8 takes at most 4 bytes a character: too long unread
            _too_long(f"caption file {str(path)!r}", path.stat().st_size, "bytes")
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise TIError(f"caption file {str(path)!r} is not UTF-8 text (at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise TIError(f"cannot read caption file {str(path)!r} ({e.strerror or type(e).__name__})") from None
    if len(text) > MAX_LINE:
        _too_long(f"caption file {str(path)!r}", len(text), "characters")
    return text


def _too_long(what: str, size: int, unit: str) -> NoReturn:
    raise TIError(f"{what} is {size} {unit} long: a caption is one prompt, at most {MAX_LINE} characters (every "
                  "training step reads it); shorten it")


def _read_metadata(path: Path) -> dict[Path, str | None]:
    """``{image path: caption or None}`` from a metadata.jsonl, skipping entries whose file is absent."""
    captions: dict[Path, str | None] = {}
    if path.stat().st_size > MAX_METADATA_FILE:
        raise TIError(f"{str(path)!r} is {path.stat().st_size} bytes, more than {MAX_METADATA_FILE} (one caption line "
                      "per image); is it the right file?")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TIError(f"{str(path)!r} line {number} is not UTF-8 text (at byte {e.start} of the line); save "
                              "the file as UTF-8") from None
            if line.strip():
                image, caption = _parse_metadata_line(path, number, line)
                captions.update(_existing_image(path, number, image, caption))
    return captions


def _parse_metadata_line(path: Path, number: int, line: str) -> tuple[Path, str | None]:
    # Errors name the line, never quote it: a webui request may name a folder whose files it cannot read.
    where = f"{str(path)!r} line {number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise TIError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line must be like "
                      '{"file_name": "a.png", "text": "a caption"}') from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise TIError(f'{where} has no "file_name" string; each line must be like '
                      '{"file_name": "a.png", "text": "a caption"}')
    text = entry.get("text", entry.get("caption"))
    if text is not None and not isinstance(text, str):
        raise TIError(f'{where}: "text" must be a string, not {type(text).__name__}')
    if text is not None and len(text) > MAX_LINE:
        _too_long(f"the caption on {where}", len(text), "characters")
    image = Path(os.path.normpath(path.parent / entry["file_name"]))
    if os.path.relpath(image, path.parent).startswith(".."):
        raise TIError(f'{where}: its file_name points outside the dataset folder; name a file inside it')
    return image, text.strip() if text is not None else None


def _existing_image(path: Path, number: int, image: Path, caption: str | None) -> dict[Path, str | None]:
    if not _is_image_name(image):
        warn(f"{path.name} line {number}: {image.name!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)}); ignored")
        return {}
    if not image.is_file():
        warn(f"{path.name} line {number}: {str(image)!r} does not exist; ignored")
        return {}
    return {image: caption}


# ---------------------------------------------------------------- loading


def load_samples(items: Sequence[ImageItem], opts: DatasetOptions, *, seed: int = 0) -> list[Sample]:
    """Read, crop and flip every image into ``Sample``s; unreadable files are skipped with a warning.

    Per image: one sample per crop (1, or ``opts.random_crops`` with random crops),
    each followed by its flipped copy when ``opts.flip``. Random crops depend only
    on ``seed`` and the file name. Raises when no image could be read.
    """
    samples: list[Sample] = []
    skipped: list[str] = []
    n_images = 0
    for item in items:
        try:
            rgb, alpha = read_image(item.path, keep_alpha=opts.use_alpha_weight)
        except UNREADABLE as e:
            warn(f"skipping {str(item.path)!r}: {unreadable_reason(e)}")
            skipped.append(f"{item.path.name} ({error_text(e)})")
            continue
        samples += _variants(rgb, alpha, item, opts, seed, image_index=n_images)
        n_images += 1
    if not samples:
        raise TIError(
            f"none of the {len(items)} image(s) could be read, so there is nothing to train on; "
            f"{len(skipped)} skipped: {'; '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
        )
    return samples


def error_text(error: BaseException) -> str:
    """'OSError: image file is truncated': what PIL said, for warnings and skip reports."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def unreadable_reason(error: BaseException) -> str:
    """Why an image file is skipped: 'cannot read it as an image (OSError: image file is truncated)'."""
    return f"cannot read it as an image ({error_text(error)})"


def read_image(path: Path, *, keep_alpha: bool = False,
               background: tuple[int, int, int] = _BACKGROUND) -> tuple[Image.Image, Image.Image | None]:
    """An RGB image (EXIF orientation applied, any mode converted) and its alpha as "L" (or None).

    Transparent pixels are composited onto ``background`` (white). The alpha is returned only
    when ``keep_alpha`` and the image has one.
    """
    im = open_image(path)
    if im.mode == "RGBA":
        alpha = im.getchannel("A")
        rgb = Image.new("RGB", im.size, background)
        rgb.paste(im, mask=alpha)
        return rgb, alpha if keep_alpha else None
    return im, None


def open_image(path: Path) -> Image.Image:
    """Decode ``path`` fully into "RGB", or "RGBA" when it has any transparency; EXIF orientation applied.

    Raises one of ``UNREADABLE`` for files PIL cannot decode (truncated files fail here, not later).
    """
    with Image.open(path) as file:
        file.load()
        im: Image.Image = ImageOps.exif_transpose(file)
    if im.mode in _HIGH_BIT_MODES:
        im = _high_bit_to_l(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return im.convert("RGBA")
    return im.convert("RGB")


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale to 8-bit "L" by scaling (PIL's own convert clips at 255: near-white)."""
    arr = np.asarray(im, dtype=np.float64)
    full = 65535.0 if im.mode != "F" else (1.0 if arr.max(initial=0.0) <= 1.0 else 255.0)
    return Image.fromarray(np.clip(np.rint(arr / full * 255.0), 0, 255).astype(np.uint8), mode="L")


def _variants(rgb: Image.Image, alpha: Image.Image | None, item: ImageItem, opts: DatasetOptions,
              seed: int, image_index: int) -> list[Sample]:
    rng = random.Random(f"ti-crop:{seed}:{item.path.name}")
    if opts.buckets:  # this image's size is its bucket's; crops and flips then work as for a fixed size
        width, height = nearest_bucket(rgb.size, opts.buckets)
        opts = dataclasses.replace(opts, width=width, height=height, buckets=())
    out = []
    for k, box in enumerate(crop_boxes(rgb.size, opts, rng)):
        pixels = _to_pixels(rgb.resize((opts.width, opts.height), _LANCZOS, box=box))
        weight = _weight(alpha, box, opts)
        base = Sample(pixels, weight, item.caption, item.path, False, k, image_index)
        out.append(base)
        if opts.flip:
            flipped_weight = weight.flip(-1) if weight is not None else None
            out.append(Sample(pixels.flip(-1), flipped_weight, item.caption, item.path, True, k, image_index))
    return out


def crop_boxes(size: tuple[int, int], opts: DatasetOptions, rng: random.Random) -> list[Box]:
    """Source-pixel boxes that ``resize(..., box=)`` scales to (width, height).

    Cover-and-crop keeps the aspect ratio; "squash" takes the whole image. Random
    crops collapse to one when the image already has the target aspect (nothing to move).
    """
    src_w, src_h = size
    if opts.crop == "squash":
        return [(0.0, 0.0, float(src_w), float(src_h))]
    scale = max(opts.width / src_w, opts.height / src_h)
    box_w, box_h = min(opts.width / scale, src_w), min(opts.height / scale, src_h)
    slack_x, slack_y = src_w - box_w, src_h - box_h
    if opts.crop == "center" or max(slack_x, slack_y) < 1.0:
        offsets = [(slack_x / 2, slack_y / 2)]
    else:
        offsets = [(rng.uniform(0, slack_x), rng.uniform(0, slack_y)) for _ in range(opts.random_crops)]
    return [(x, y, x + box_w, y + box_h) for x, y in offsets]


def _to_pixels(rgb: Image.Image) -> torch.Tensor:
    import torch

    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _weight(alpha: Image.Image | None, box: Box, opts: DatasetOptions) -> torch.Tensor | None:
    """Loss weights from alpha like the webui (w -= min; w /= mean), all ones when there is nothing to weight."""
    import torch

    if not opts.use_alpha_weight:
        return None
    if alpha is None:
        return torch.ones(opts.height, opts.width)
    resized = alpha.resize((opts.width, opts.height), _LANCZOS, box=box)
    w = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    w = w - w.min()
    mean = w.mean()
    # A constant alpha (e.g. fully opaque) would divide by zero in the webui: weight everything equally.
    return w / mean if mean > 1e-6 else torch.ones_like(w)
