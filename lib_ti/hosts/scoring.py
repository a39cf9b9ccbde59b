"""Checkpoint scoring inside the webui, for the tab: ``score_run_folder(run_dir, ...)``.

The run's checkpoints are rendered by the host's own txt2img on the loaded checkpoint (the run's
preview settings) and scored with a local CLIP model by ``lib_ti.scoring.score``, exactly as
``python -m lib_ti score`` does headless; ``report_markdown`` is the table for the tab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import TIError
from ..scoring.defaults import DEFAULT_CLIP, EDIT_PROMPTS
from ..scoring.score import ScoreOptions, ScoreReport, list_checkpoints, run_config, score_run
from . import registry, runner

TAB_CLIP_USE = "type that folder's path in CLIP model (Score checkpoints, in the Train Embedding tab)"


def score_run_folder(run_dir: str | Path, *, clip: str = DEFAULT_CLIP, seeds: int = 2,
                     prompts: Sequence[str] = EDIT_PROMPTS, clip_use: str = TAB_CLIP_USE,
                     progress: Callable[[str], None] = lambda _msg: None) -> ScoreReport:
    """Score every checkpoint of the run in ``run_dir`` on the loaded checkpoint; refused while a run trains.
    ``clip_use`` ends the message when no CLIP model is found: how to name one where the caller asks."""
    job = runner.current_job()
    if job is not None:
        raise TIError(f"a training run is active ({job.name}): score its checkpoints once it has ended")
    opts = ScoreOptions(str(run_dir), clip=clip, prompts=tuple(prompts), seeds=seeds)
    name = run_config(opts.run_dir).name
    list_checkpoints(opts.run_dir, name)  # nothing to score: said before CLIP or the model is touched
    from ..scoring.clip import load_clip, locate_clip  # heavy: transformers

    locate_clip(clip, use=clip_use)  # no CLIP model: how to get one, before the host's model is touched
    host = registry.current_host()
    engine = host.engine()
    model = load_clip(clip, device=engine.device)
    with host.session(engine, name):
        return score_run(engine, model, opts, progress=progress)


def report_markdown(report: ScoreReport) -> str:
    """The scores as a Markdown table, the recommended checkpoint in bold."""
    lines = ["| step | fidelity | editability | balance |", "|---|---|---|---|"]
    for r in report.rows:
        cells = [str(r.step), f"{r.fidelity:.3f}", f"{r.editability:.3f}", f"{r.balance:.2f}"]
        if r.step == report.recommended:
            cells = [f"**{c}**" for c in cells]
            cells[0] += " (recommended)"
        lines.append("| " + " | ".join(cells) + " |")
    best = next(r for r in report.rows if r.step == report.recommended)
    lines.append(f"\nRecommended: step {report.recommended}, `{best.path}`. Fidelity: CLIP similarity of "
                 f"'{report.fidelity_prompt}' to {report.training_images} training images; editability: of "
                 f"{len(report.edit_prompts)} new-context prompts to their text. CLIP: {report.clip}.")
    return "\n".join(lines)
