"""Render prompts through an engine and score the renders with the shapes classifier.

Renders go through ``engine.render_preview``, the path training previews take, so any engine
(the standalone one, a webui adapter) is measured the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..engine import PreviewRequest
from .classifier import Prediction, ShapeClassifier, classify
from .shapes import COLOUR_NAMES, IMAGE_SIZE, SHAPES

NO_TOKEN = "micro-eval-no-token"  # a name no prompt contains: plain prompts need no vectors


@dataclass(frozen=True)
class Case:
    """A prompt and what a render of it should show."""

    prompt: str
    shape: str
    colour: str
    background: str
    seed: int


def render(engine, cases: Sequence[Case], *, token: str = NO_TOKEN, vectors: dict[str, torch.Tensor] | None = None,
           steps: int = 20, cfg_scale: float = 7.0, on_render: Callable[[int], None] | None = None) -> list:
    """One PIL image per case, each from its own seed; ``vectors`` are spliced wherever ``token`` appears."""
    vectors = vectors if vectors is not None else engine.init_vectors("", 1)
    images = []
    for i, case in enumerate(cases):
        request = PreviewRequest(case.prompt, "", steps, cfg_scale, case.seed, IMAGE_SIZE, IMAGE_SIZE)
        with torch.no_grad():
            images.append(engine.render_preview(request, token, vectors))
        if on_render is not None:
            on_render(i)
    return images


def score(predictions: Sequence[Prediction], cases: Sequence[Case]) -> dict[str, float]:
    """Fraction of renders whose shape, colour, background (and all three) match the case."""
    n = len(cases)
    hits = {name: sum(getattr(p, name) == getattr(c, name) for p, c in zip(predictions, cases, strict=True)) / n
            for name in ("shape", "colour", "background")}
    hits["all"] = (
        sum(p == Prediction(c.shape, c.colour, c.background) for p, c in zip(predictions, cases, strict=True)) / n
    )
    return hits


def plain_cases(n: int, seed: int) -> list[Case]:
    """``n`` prompts "a <colour> <shape> on a <background> background", every shape equally often."""
    rng = random.Random(f"prompt-following-{seed}")
    cases = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour, background = rng.sample(COLOUR_NAMES, 2)
        cases.append(
            Case(f"a {colour} {shape} on a {background} background", shape, colour, background, seed * 1000 + i)
        )
    return cases


def prompt_following(engine, classifier: ShapeClassifier, *, n: int, seed: int, steps: int, cfg_scale: float,
                     on_render: Callable[[int], None] | None = None) -> dict:
    """How often the model draws what plain prompts ask for, as the classifier sees it."""
    cases = plain_cases(n, seed)
    images = render(engine, cases, steps=steps, cfg_scale=cfg_scale, on_render=on_render)
    return {"renders": n, "sampler_steps": steps, "cfg_scale": cfg_scale,
            **score(classify(classifier, images), cases)}
