"""Prepare a folder of training images: decode, convert, crop or tile, flip, de-duplicate, write PNGs.

``run(PrepareOptions(src=..., dst=...))`` reads every image of ``src`` (never writing there) and
writes training-ready PNGs of the training size, with their captions, into ``dst``:

* any file PIL decodes: CMYK, 16-bit, palette, alpha (flattened onto ``background`` unless
  ``keep_alpha``), EXIF-rotated (turned upright); undecodable files are skipped with the reason;
* one crop per image, at the centre or around the subject (``crops.subject_box``), at the training
  size or, with ``auto_size``, at the 64-multiple size nearest the image's aspect (a training bucket);
* ``split``: images far longer than the target aspect become overlapping tiles instead of one crop;
* ``flip``: a mirrored copy of each output; ``dedupe``: identical pixels are written once.

Output names keep the source stem (unicode included; only characters file systems reject are
replaced), so they are stable across runs: ``<stem>.png``, ``<stem>-t01.png`` for tiles,
``<stem>-flip.png`` for mirrored copies, and ``<stem>_<ext>`` when two sources share a stem.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from PIL import Image, ImageColor, ImageOps

from ..buckets import bucket_sizes, check_bucket_sides, check_side, nearest_bucket
from ..errors import PREFIX
from ..fileio import atomic_path, write_text
from ..images import IMAGE_EXTENSIONS, UNREADABLE, ImageItem, discover, open_image, unreadable_reason
from ..options import bad, check_types, option
from .crops import Box, cover_box, is_oversized, subject_box, tile_boxes
from .reports import Skipped, skip, skipped_lines

PrepareCrop = Literal["center", "subject"]
Progress = Callable[[int, int, Path], None]  # (files done, files in all, the file just done)

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS
# Characters Windows, macOS or Linux refuse in a file name, and control characters.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_MAX_STEM = 100  # characters; leaves room for suffixes within every file system's 255-byte limit


# Sections group the options in the webui's dataset tab: the common ones first, the others folded.
COMMON, MORE = "Prepare images", "More options"


@dataclass
class PrepareOptions:
    src: str = option("", "folder of source images (with optional .txt captions or metadata.jsonl); never modified",
                      label="Source folder", section=COMMON)
    dst: str = option("", "output folder for the prepared PNGs and their captions", label="Output folder",
                      section=COMMON)
    width: int = option(512, "output width in pixels (multiple of 8): the training width", section=COMMON)
    height: int = option(512, "output height in pixels (multiple of 8): the training height", section=COMMON)
    crop: PrepareCrop = option("center", "center: keep the middle; subject: move the crop to the detail (edges, "
                               "saliency; faces when OpenCV is installed)", section=COMMON)
    auto_size: bool = option(False, "crop each image to the 64-multiple size nearest its own aspect with area <= "
                             "width x height (the training buckets) instead of width x height",
                             label="Auto-size near each image's aspect", section=COMMON)
    bucket_min_side: int = option(0, "auto_size: shortest side, a multiple of 64 (0 = half the shorter of "
                                  "width/height)", section=MORE)
    bucket_max_side: int = option(0, "auto_size: longest side, a multiple of 64 (0 = twice the longer of "
                                  "width/height)", section=MORE)
    split: bool = option(False, "split images much longer than the target aspect into overlapping tiles instead of "
                         "one crop", label="Split oversized images into tiles", section=COMMON)
    split_threshold: float = option(0.5, "split when an image is more than 1 + this times as long as the target "
                                    "aspect", section=MORE)
    split_overlap: float = option(0.2, "fraction of a tile shared with its neighbour (0 to 0.9)", section=MORE)
    flip: bool = option(False, "also write a mirrored copy of each output (not for asymmetric subjects such as "
                        "text)", label="Add flipped copies", section=COMMON)
    keep_alpha: bool = option(False, "keep transparency (RGBA PNG) instead of flattening it onto the background "
                              "colour", section=MORE)
    background: str = option("#ffffff", "colour transparent pixels are flattened onto: a name or #rrggbb",
                             section=MORE)
    dedupe: bool = option(True, "write images with identical decoded pixels once", label="Drop duplicates",
                          section=COMMON)
    min_size: int = option(32, "skip images whose shorter side is below this many pixels", section=MORE)
    overwrite: bool = option(False, "allow writing into a folder that already holds images (same-named files are "
                             "replaced)", label="Overwrite outputs", section=COMMON)
    caption_extension: str = option(".txt", "caption files copied along with each image", section=MORE)

    def __post_init__(self) -> None:
        check_types(self, "prepare")
        for name in ("width", "height"):
            check_side("prepare", name, getattr(self, name))
        check_bucket_sides("prepare", self.bucket_min_side, self.bucket_max_side)
        if not 0 <= self.split_threshold <= 100:
            _bad("split_threshold", self.split_threshold, "use a number from 0 (split anything not of the target "
                 "aspect) up to 100; 0.5 is the webui's default")
        if not 0 <= self.split_overlap <= 0.9:
            _bad("split_overlap", self.split_overlap, "use a fraction from 0 to 0.9")
        if self.min_size < 1:
            _bad("min_size", self.min_size, "use a whole number of pixels, at least 1")
        if self.auto_size:
            bucket_sizes(self.width, self.height, self.bucket_min_side, self.bucket_max_side)  # raises when none fits
        self.background_rgb  # noqa: B018 - validates the colour now, before any file is read

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        try:
            return ImageColor.getrgb(self.background)[:3]
        except ValueError:
            _bad("background", self.background, "use a colour name such as white or a hex colour such as #808080")


@dataclass(frozen=True)
class Written:
    source: Path
    path: Path
    size: tuple[int, int]
    tile: int = 0  # 1, 2, ... for the tiles of a split image
    flipped: bool = False


@dataclass
class PrepareReport:
    src: Path
    dst: Path
    sources: int = 0
    written: list[Written] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    stopped: bool = False  # should_stop() asked to stop before every source was done

    def format(self) -> str:
        used = len({w.source for w in self.written})
        sizes = Counter(w.size for w in self.written)
        lines = [f"{PREFIX} prepared {str(self.src)!r} -> {str(self.dst)!r}: {len(self.written)} image(s) written "
                 f"from {used} of {self.sources} source(s), {len(self.skipped)} skipped"
                 + (" (stopped early)" if self.stopped else ""),
                 "  sizes: " + (", ".join(f"{w}x{h} x{n}" for (w, h), n in sorted(sizes.items())) or "none")]
        tiles = Counter(w.source for w in self.written if w.tile and not w.flipped)
        lines += [f"  {source.name}: split into {n} tiles" for source, n in tiles.items()]
        return "\n".join(lines + skipped_lines(self.skipped))


def run(opts: PrepareOptions, on_progress: Progress | None = None,
        should_stop: Callable[[], bool] = lambda: False) -> PrepareReport:
    """Prepare ``opts.src`` into ``opts.dst``; every problem with the folders is raised before any file is written.

    ``should_stop`` is asked before each source image (the webui's Interrupt button).
    """
    src, dst = _check_folders(opts)
    items = discover(src, caption_extension=opts.caption_extension)
    stems = output_stems([item.path for item in items])
    report = PrepareReport(src, dst, sources=len(items))
    writer = _Writer(opts, dst, report)
    for done, item in enumerate(items, start=1):
        if should_stop():
            report.stopped = True
            break
        writer.prepare(item, stems[item.path])
        if on_progress is not None:
            on_progress(done, len(items), item.path)
    return report


def _check_folders(opts: PrepareOptions) -> tuple[Path, Path]:
    src, dst = Path(opts.src).expanduser().resolve(), Path(opts.dst).expanduser().resolve()
    if not src.is_dir():
        _bad("src", opts.src, "give an existing folder of images")
    if dst == src or src in dst.parents:
        _bad("dst", opts.dst, "the source folder is never modified: choose an output folder outside it")
    if dst.is_file():
        _bad("dst", opts.dst, "it is a file: give a folder (it is created when missing)")
    taken = [p.name for p in dst.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS] if dst.is_dir() else []
    if taken and not opts.overwrite:
        _bad("dst", opts.dst, f"it already holds {len(taken)} image(s) (e.g. {taken[0]!r}): choose an empty folder "
             "or allow overwrite")
    return src, dst


class _Writer:
    """Turns one source image into its output files, remembering what was written for de-duplication."""

    def __init__(self, opts: PrepareOptions, dst: Path, report: PrepareReport) -> None:
        self.opts, self.dst, self.report = opts, dst, report
        self.target = (opts.width, opts.height)
        sides = (opts.bucket_min_side, opts.bucket_max_side)
        self.buckets = bucket_sizes(opts.width, opts.height, *sides) if opts.auto_size else []
        self.seen: dict[str, Path] = {}  # pixel hash -> first source with those pixels
        self.names: set[str] = set()  # output names (casefolded) written by this run

    def prepare(self, item: ImageItem, stem: str) -> None:
        image = self.decode(item.path)
        if image is None:
            return
        for tile, out in self.render(image):
            name = f"{stem}-t{tile:02d}" if tile else stem
            variants = [(name, out, False)]
            mirrored = ImageOps.mirror(out) if self.opts.flip else None
            if mirrored is not None and mirrored.tobytes() != out.tobytes():  # a symmetric image's flip adds nothing
                variants.append((f"{name}-flip", mirrored, True))
            for variant_name, variant, flipped in variants:
                path = self.write(item, variant_name, variant)
                self.report.written.append(Written(item.path, path, variant.size, tile, flipped))

    def decode(self, path: Path) -> Image.Image | None:
        """The source as RGB/RGBA, or None after recording why it is skipped."""
        skipped = self.report.skipped
        try:
            image = open_image(path)
        except UNREADABLE as e:
            skip(skipped, path, unreadable_reason(e))
            return None
        if min(image.size) < self.opts.min_size:
            skip(skipped, path, f"{image.width}x{image.height} px is below min_size={self.opts.min_size}: "
                 "too small to train on")
            return None
        digest = pixel_hash(image)
        if self.opts.dedupe and digest in self.seen:
            skip(skipped, path, f"duplicate of {self.seen[digest].name} (same pixels)")
            return None
        self.seen.setdefault(digest, path)
        if image.mode == "RGBA" and not self.opts.keep_alpha:
            flat = Image.new("RGB", image.size, self.opts.background_rgb)
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        return image

    def render(self, image: Image.Image) -> list[tuple[int, Image.Image]]:
        """(tile number, output image) for each tile of ``image`` (numbered from 1), or (0, the one crop)."""
        opts = self.opts
        if opts.split and is_oversized(image.size, self.target, opts.split_threshold):
            boxes = tile_boxes(image.size, self.target, opts.split_overlap)
            return [(k, _resized(image, self.target, box)) for k, box in enumerate(boxes, start=1)]
        size = nearest_bucket(image.size, self.buckets) if self.buckets else self.target
        box = subject_box(image, size) if opts.crop == "subject" else cover_box(image.size, size)
        return [(0, _resized(image, size, box))]

    def write(self, item: ImageItem, name: str, image: Image.Image) -> Path:
        unique, k = name, 2
        while unique.casefold() in self.names:  # e.g. a source named "a-t01" next to the tiles of "a"
            unique, k = f"{name}-{k}", k + 1
        self.names.add(unique.casefold())
        path = self.dst / f"{unique}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        if item.caption is not None:
            write_text(self.dst / f"{unique}{self.opts.caption_extension}", item.caption)
        return path


def _resized(image: Image.Image, size: tuple[int, int], box: Box) -> Image.Image:
    return image.resize(size, _LANCZOS, box=box)


def pixel_hash(image: Image.Image) -> str:
    """Identity of the decoded pixels: the same picture saved as PNG and as BMP hashes the same."""
    digest = hashlib.blake2b(f"{image.mode}:{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def safe_stem(stem: str) -> str:
    """``stem`` as a portable file name: unicode kept (NFC), characters file systems reject replaced by '_'."""
    text = _UNSAFE.sub("_", unicodedata.normalize("NFC", stem)).strip().rstrip(".")
    return text[:_MAX_STEM] or "image"


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """A unique output stem for each source, depending only on the set of source names (stable across runs).

    Two sources with the same stem (``a.png``, ``a.jpg``) become ``a_png`` and ``a_jpg``; names are
    compared case-insensitively, as macOS and Windows do.
    """
    base = {p: safe_stem(p.stem) for p in paths}
    shared = Counter(stem.casefold() for stem in base.values())
    out: dict[Path, str] = {}
    used: set[str] = set()
    for path in sorted(paths, key=os.fspath):
        stem = base[path]
        if shared[stem.casefold()] > 1:
            stem = f"{stem}_{path.suffix[1:].lower()}"
        unique, k = stem, 2
        while unique.casefold() in used:
            unique, k = f"{stem}-{k}", k + 1
        used.add(unique.casefold())
        out[path] = unique
    return out


def _bad(name: str, value: object, fix: str) -> NoReturn:
    bad("prepare", name, value, fix)
