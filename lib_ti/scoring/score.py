"""Score a run's checkpoints the way the Textual Inversion paper measures embeddings, and recommend one.

For every saved checkpoint of a run (``checkpoints/<name>-<step>.<ext>``) the run's own preview
settings (size, sampling steps, CFG scale, seed, negative prompt) render

* the preview prompt (``preview_prompt``, else the first training prompt) with a few seeds, scored
  for **fidelity**: the mean CLIP image-image cosine similarity of these renders to the training
  images (does the embedding look like the concept?);
* prompts that put the concept in new contexts ("a photo of [name] on the beach", ...), scored for
  **editability**: the mean CLIP image-text cosine similarity of each render to its prompt with the
  embedding's word left out (does the rest of the prompt still work?).

Training longer raises fidelity and lowers editability. The recommended checkpoint is the one with
the best sum of the two, each rescaled to 0..1 over the run's checkpoints (the earlier step on a
tie): the one nearest to the best of both. The table, ``scores.json`` and ``grid.png`` (one row per
checkpoint, one column per prompt at the first seed) go to ``<run>/scores/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoints import checkpoint_dir
from ..config import TrainConfig
from ..data import prepare_data
from ..embedding import match_to_model
from ..engine import PreviewRequest
from ..errors import TIError
from ..fileio import write_text
from ..formats.embeddings import load_embedding
from ..grid import image_grid, save_png
from ..images import UNREADABLE, discover, open_image
from ..templates import NAME
from ..trainer import preview_request
from .clip import Clip
from .defaults import DEFAULT_CLIP, EDIT_PROMPTS

MAX_TRAINING_IMAGES = 64  # fidelity compares with at most this many training images (the first, sorted by name)


@dataclass(frozen=True)
class ScoreOptions:
    run_dir: str
    clip: str = DEFAULT_CLIP
    prompts: tuple[str, ...] = EDIT_PROMPTS  # editability prompts, each with [name]
    seeds: int = 2  # renders per prompt: preview_seed, preview_seed + 1, ...
    data_dir: str = ""  # the training images, when they have moved since the run ("" = the run's data_dir)
    out: str = ""  # "" = <run>/scores

    def __post_init__(self) -> None:
        if not 1 <= self.seeds <= 64:
            raise TIError(f"score: seeds={self.seeds} is invalid: use a whole number from 1 to 64")
        if not self.prompts:
            raise TIError("score: give at least one editability prompt (with [name] where the embedding goes)")
        unnamed = [p for p in self.prompts if NAME not in p]
        if unnamed:
            raise TIError(f"score: the prompt {unnamed[0]!r} has no {NAME}: put {NAME} where the embedding goes, "
                          "e.g. 'a photo of a [name] on the beach'")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run_dir) / "scores"


@dataclass
class CheckpointScore:
    step: int
    path: str
    fidelity: float
    editability: float
    balance: float = 0.0  # fidelity and editability rescaled to 0..1 over the run's checkpoints, summed


@dataclass
class ScoreReport:
    run_dir: str
    name: str
    clip: str
    fidelity_prompt: str
    edit_prompts: list[str]
    seeds: int
    training_images: int
    rows: list[CheckpointScore]
    recommended: int  # the step
    grid: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- what a run holds
def run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TIError(f"{str(run_dir)!r} is not a training run folder (it has no config.yaml): give the folder a run "
                      "wrote, e.g. outputs/my-embedding")
    return TrainConfig.load(path)


def list_checkpoints(run_dir: str | Path, name: str) -> list[tuple[int, Path]]:
    """(step, embedding file) of every checkpoint of ``name`` in the run, oldest first."""
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.(safetensors|pt)")
    folder = checkpoint_dir(Path(run_dir))
    found: dict[int, Path] = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.setdefault(int(match.group(1)), path)
    if not found:
        raise TIError(f"the run {str(run_dir)!r} has no checkpoints of {name!r} in {str(folder)!r} to score: train "
                      "with save_every > 0 (and keep_last 0 to keep them all)")
    return sorted(found.items())


def training_images(data_dir: str, limit: int = MAX_TRAINING_IMAGES) -> list:
    images = []
    for item in discover(data_dir)[:limit]:
        try:
            images.append(open_image(item.path).convert("RGB"))
        except UNREADABLE:
            continue  # training skipped it too
    if not images:
        raise TIError(f"none of the images in {data_dir!r} can be read: fidelity compares renders with them")
    return images


def edit_text(prompt: str) -> str:
    """The prompt without the embedding's word, as the paper scores editability: 'a photo of on the beach'."""
    return " ".join(prompt.replace(NAME, " ").split())


def balance(values: Sequence[float]) -> list[float]:
    """``values`` rescaled to 0..1 (all 1.0 when they are equal)."""
    low, high = min(values), max(values)
    return [1.0 if high == low else (v - low) / (high - low) for v in values]


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span (1, 2.5, 2.5, 4)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (the Pearson correlation of the ranks, so ties are handled); None when it
    is undefined: fewer than two pairs, or one side constant."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} values against {len(ys)}")
    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / (vx * vy) ** 0.5


def recommend(rows: list[CheckpointScore]) -> int:
    """The step with the best rescaled fidelity + editability; the earliest on a tie."""
    for row, f, e in zip(rows, balance([r.fidelity for r in rows]), balance([r.editability for r in rows]),
                         strict=True):
        row.balance = f + e
    return max(rows, key=lambda r: (round(r.balance, 9), -r.step)).step


# ---------------------------------------------------------------------- scoring
def score_run(engine, clip: Clip, opts: ScoreOptions, *, clip_name: str = "",
              progress: Callable[[str], None] = lambda _msg: None) -> ScoreReport:
    """Render and score every checkpoint of the run in ``opts.run_dir`` on ``engine``; write the table's files."""
    cfg = run_config(opts.run_dir)
    if opts.data_dir:
        cfg = cfg.replace(data_dir=opts.data_dir)
    checkpoints = list_checkpoints(opts.run_dir, cfg.name)
    base = preview_request(cfg, prepare_data(cfg))
    reference = clip.image_features(training_images(cfg.data_dir))
    prompts = [base.prompt] + [p.replace(NAME, cfg.name) for p in opts.prompts]
    texts = clip.text_features([edit_text(p) for p in opts.prompts])
    rows, grid_rows = [], []
    for step, path in checkpoints:
        progress(f"rendering {len(prompts) * opts.seeds} images with checkpoint step {step}")
        vectors = match_to_model(load_embedding(path), engine.encoder_widths).vectors
        renders = [[_render(engine, base, prompt, base.seed + i, cfg.name, vectors) for i in range(opts.seeds)]
                   for prompt in prompts]
        fidelity = float((clip.image_features(renders[0]) @ reference.T).mean())
        edit = torch.stack([(clip.image_features(r) @ texts[i]).mean() for i, r in enumerate(renders[1:])])
        rows.append(CheckpointScore(step, str(path), round(fidelity, 5), round(float(edit.mean()), 5)))
        grid_rows.append([r[0] for r in renders])
    best = recommend(rows)
    report = ScoreReport(str(opts.run_dir), cfg.name, clip_name or opts.clip, base.prompt, list(opts.prompts),
                         opts.seeds, len(reference), rows, best)
    _write(report, grid_rows, opts.out_dir)
    return report


def _render(engine, base: PreviewRequest, prompt: str, seed: int, token: str, vectors: dict[str, torch.Tensor]):
    request = PreviewRequest(prompt, base.negative_prompt, base.steps, base.cfg_scale, seed, base.width,
                             base.height, base.sampler_name)
    with torch.no_grad():
        return engine.render_preview(request, token, vectors)


def _write(report: ScoreReport, grid_rows: list[list], out: Path) -> None:
    labels = [f"step {r.step}{'  *' if r.step == report.recommended else ''}\nfidelity {r.fidelity:.3f}\n"
              f"editability {r.editability:.3f}" for r in report.rows]
    title = (f"{report.name}: '{report.fidelity_prompt}', then the {len(report.edit_prompts)} editability prompts "
             "(scores.json); * recommended")
    report.grid = str(save_png(image_grid(grid_rows, labels, title), out / "grid.png"))
    report.files = {"grid": report.grid, "json": str(out / "scores.json")}
    write_text(out / "scores.json", json.dumps(report.to_dict(), indent=2) + "\n")


def format_report(report: ScoreReport) -> str:
    lines = [f"{'step':>7}{'fidelity':>10}{'editability':>13}{'balance':>9}"]
    for r in report.rows:
        mark = "  <- recommended" if r.step == report.recommended else ""
        lines.append(f"{r.step:>7}{r.fidelity:>10.3f}{r.editability:>13.3f}{r.balance:>9.2f}{mark}")
    lines += [
        f"fidelity      CLIP image-image similarity of '{report.fidelity_prompt}' ({report.seeds} seeds) to "
        f"{report.training_images} training images",
        f"editability   CLIP image-text similarity of {len(report.edit_prompts)} prompts x {report.seeds} seeds to "
        "their text without the embedding",
        f"clip          {report.clip}",
        f"recommended   step {report.recommended}: {next(r.path for r in report.rows if r.step == report.recommended)}",
        f"files         {report.files.get('grid', '')}, {report.files.get('json', '')}",
    ]
    return "\n".join(lines)
