"""A labelled grid of renders (rows = checkpoints, columns = prompts): bench quality's, and checkpoint scoring's.

Cells are square; the micro model's 64px renders are enlarged nearest-neighbour (what the classifier saw, not a
smoothed version), larger renders are shrunk smoothly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .fileio import atomic_path

CELL = 128  # 64px renders shown at 2x
LABEL_WIDTH = 150
HEADER = 18


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], title: str = "",
               cell: int = CELL) -> Image.Image:
    """Rows of equally many images, each row labelled on its left (a label may have several lines)."""
    n_cols = max(len(r) for r in rows)
    top = HEADER if title else 0
    grid = Image.new("RGB", (LABEL_WIDTH + n_cols * cell, top + len(rows) * cell), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    if title:
        pen.text((4, 3), title, fill=(0, 0, 0))
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = top + r * cell
        pen.multiline_text((4, y + 4), label, fill=(0, 0, 0), spacing=3)
        for c, image in enumerate(images):
            grid.paste(_cell(image, cell), (LABEL_WIDTH + c * cell, y))
    return grid


def _cell(image: Image.Image, cell: int) -> Image.Image:
    smaller = image.width < cell or image.height < cell
    resample = Image.Resampling.NEAREST if smaller else Image.Resampling.LANCZOS
    return image.convert("RGB").resize((cell, cell), resample)


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
