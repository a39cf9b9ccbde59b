"""Real image files in the variants that break naive loaders, drawn with PIL (no fixtures on disk).

``draw_tricky(folder)`` writes one file per variant and returns ``{variant: path}``. The pixels are
chosen so tests can check what came out: colours, orientation, sizes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
UNICODE_NAME = "café ☕.png"
ORIENTATION = 0x0112  # the EXIF tag; 6 = "rotate 90 degrees clockwise to display"


def draw_tricky(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "cmyk": _cmyk(folder / "cmyk.jpg"),
        "deep16": _sixteen_bit(folder / "deep16.png"),
        "palette": _palette_with_transparency(folder / "palette.png"),
        "rotated": _exif_rotated(folder / "rotated.jpg"),
        "truncated": _truncated(folder / "truncated.png"),
        "text": _text_named_png(folder / "notes.png"),
        "dot": _one_pixel(folder / "dot.png"),
        "banner": _banner(folder / "banner.png"),
        "unicode": _shapes(folder / UNICODE_NAME),
    }
    paths["copy"] = Path(shutil.copyfile(paths["unicode"], folder / "copy.png"))  # byte-identical duplicate
    (folder / "café ☕.txt").write_text("a cup of coffee", encoding="utf-8")
    (folder / "rotated.txt").write_text("[name], red over blue", encoding="utf-8")
    return paths


def halves(size, first, second, vertical_split=True) -> Image.Image:
    """``first`` colour on the left (or top) half, ``second`` on the other."""
    w, h = size
    im = Image.new("RGB", size, second)
    im.paste(first, (0, 0, w // 2, h) if vertical_split else (0, 0, w, h // 2))
    return im


def _cmyk(path: Path) -> Path:
    Image.new("CMYK", (96, 64), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)  # pure red in CMYK
    return path


def _sixteen_bit(path: Path) -> Path:
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (64, 1))  # black to white, left to right
    Image.fromarray(ramp).save(path, format="PNG")  # uint16 -> mode "I;16"
    return path


def _palette_with_transparency(path: Path) -> Path:
    im = Image.new("P", (96, 64), 0)
    im.putpalette([0, 0, 0, *GREEN] + [0] * (254 * 3))
    im.paste(1, (48, 0, 96, 64))  # right half green, left half index 0 = transparent
    im.save(path, format="PNG", transparency=0)
    return path


def _exif_rotated(path: Path) -> Path:
    """Stored 80x40 with red on the left; orientation 6 shows it 40x80 with red on top."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    halves((80, 40), RED, BLUE).save(path, format="JPEG", quality=95, exif=exif)
    return path


def _truncated(path: Path) -> Path:
    full = path.with_suffix(".full")
    _shapes(full, size=(96, 96), fmt="PNG")
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_named_png(path: Path) -> Path:
    path.write_text("these are my notes, not an image\n", encoding="utf-8")
    return path


def _one_pixel(path: Path) -> Path:
    Image.new("RGB", (1, 1), BLUE).save(path)
    return path


def _banner(path: Path) -> Path:
    """8000x200: coloured stripes every 400 px, so every tile differs from its neighbours."""
    im = Image.new("RGB", (8000, 200), (250, 250, 250))
    draw = ImageDraw.Draw(im)
    for i, x in enumerate(range(0, 8000, 400)):
        draw.rectangle([x, 0, x + 199, 199], fill=((i * 40) % 256, (i * 90) % 256, 200))
    im.save(path)
    return path


def _shapes(path: Path, size=(128, 96), fmt=None) -> Path:
    im = Image.new("RGB", size, (30, 60, 90))
    draw = ImageDraw.Draw(im)
    draw.ellipse([10, 10, size[0] // 2, size[1] - 10], fill=(240, 200, 20))
    draw.rectangle([size[0] // 2, 20, size[0] - 10, size[1] // 2], fill=(200, 30, 120))
    im.save(path, format=fmt)
    return path
