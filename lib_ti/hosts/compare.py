"""A comparison grid: chosen prompts x checkpoints of one embedding, rendered by the host's txt2img.

Rows are prompts, columns checkpoints (``name-STEP`` copies, then the final embedding), each cell one
render with the run's preview parameters (sampler, steps, CFG, seed, size): the same seed in every
cell, so the columns differ only by the embedding. The user picks the best step without an X/Y plot.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ..config import TrainConfig
from ..engine import PreviewRequest
from ..errors import TIError
from . import registry, runner

MAX_PROMPTS = 8
MAX_CHECKPOINTS = 12
LABEL_HEIGHT = 28


def published_checkpoints(cfg: TrainConfig) -> list[str]:
    """The prompt names of ``cfg.name``'s published checkpoints, by step, then the final embedding's."""
    folder = runner.checkpoint_folder(cfg)
    pattern = re.compile(rf"{re.escape(cfg.name)}-(\d+)")
    steps = sorted(int(m.group(1)) for p in folder.glob(f"{cfg.name}-*.*")
                   if p.suffix in (".safetensors", ".pt") and (m := pattern.fullmatch(p.stem)))
    names = [f"{cfg.name}-{step}" for step in dict.fromkeys(steps)]
    if runner.final_target(cfg).exists():
        names.append(cfg.name)
    return names


def checkpoints_from(text: str, cfg: TrainConfig) -> list[str]:
    """The checkpoints the user listed (comma or line separated), else every published one; each must exist."""
    available = published_checkpoints(cfg)
    chosen = [part.strip() for part in re.split(r"[,\n]", text or "") if part.strip()] or available
    if not chosen:
        raise TIError(f"{cfg.name!r} has no published checkpoint yet: train it (with Save every N steps) first")
    missing = [name for name in chosen if name not in available]
    if missing:
        raise TIError(f"no published checkpoint named {', '.join(map(repr, missing))}; {cfg.name!r} has: "
                      f"{', '.join(available) or 'none'}")
    if len(chosen) > MAX_CHECKPOINTS:
        raise TIError(f"{len(chosen)} checkpoints: a grid takes at most {MAX_CHECKPOINTS}; list the ones to compare")
    return chosen


def prompts_from(text: str, cfg: TrainConfig) -> list[str]:
    """One prompt a line, each naming the embedding ([name] or its name); empty: the run's preview prompt."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        lines = [cfg.preview_prompt or "a photo of [name]"]
    if len(lines) > MAX_PROMPTS:
        raise TIError(f"{len(lines)} prompts: a grid takes at most {MAX_PROMPTS}")
    unnamed = [line for line in lines if "[name]" not in line and not _mentions(line, cfg.name)]
    if unnamed:
        raise TIError(f"these prompts do not name the embedding, so every column would be the same: "
                      f"{'; '.join(unnamed)}. Write [name] (or {cfg.name}) where it goes")
    return lines


def prompt_for(line: str, name: str, checkpoint: str) -> str:
    """``line`` with [name] (and the embedding's own name as a word) replaced by the checkpoint's name."""
    line = line.replace("[name]", checkpoint)
    return re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", checkpoint, line) if checkpoint != name else line


def _mentions(line: str, name: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", line) is not None


def compose(cells: list[list], row_labels: list[str], column_labels: list[str]):
    """A labelled grid of PIL images (rows x columns, all the size of the first)."""
    from PIL import Image, ImageDraw

    width, height = cells[0][0].size
    left = min(260, max(120, width))
    grid = Image.new("RGB", (left + width * len(column_labels), LABEL_HEIGHT + height * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((left + c * width + 4, 6), label, fill="black")
    for r, label in enumerate(row_labels):
        draw.multiline_text((4, LABEL_HEIGHT + r * height + 4), _wrap(label, max(8, left // 7)), fill="black")
        for c, image in enumerate(cells[r]):
            grid.paste(image.convert("RGB").resize((width, height)), (left + c * width, LABEL_HEIGHT + r * height))
    return grid


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line][:8])


def render_grid(cfg: TrainConfig, prompts_text: str, checkpoints_text: str) -> Path:
    """Render the grid through the host's txt2img; saved in the run folder's grids/, returned as its path."""
    prompts = prompts_from(prompts_text, cfg)
    checkpoints = checkpoints_from(checkpoints_text, cfg)
    host = registry.current_host()
    cells = [[host.txt2img(_request(cfg, prompt_for(line, cfg.name, ckpt))) for ckpt in checkpoints]
             for line in prompts]
    grid = compose(cells, prompts, checkpoints)
    run_dir = runner.resolve_run_dir(cfg)
    path = run_dir / "grids" / f"{cfg.name}-grid-{time.strftime('%Y%m%d-%H%M%S')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _request(cfg: TrainConfig, prompt: str) -> PreviewRequest:
    return PreviewRequest(prompt, cfg.preview_negative_prompt, cfg.preview_steps, cfg.preview_cfg_scale,
                          cfg.preview_seed, cfg.preview_width or cfg.width, cfg.preview_height or cfg.height,
                          cfg.preview_sampler)
