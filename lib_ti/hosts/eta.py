"""Time left in a training run, from its schedule: the steps, saves and previews still to come, each at its
own measured cost.

A run's time is lumpy: previews (a txt2img render each) and saves come every N steps, so extrapolating the
seconds per step seen so far is low until the first preview happened and high just after one (the
host's bar was ~23 % low at 10 % of a micro-model run with previews). Here each kind of work is timed
apart from the events' arrival times, and the time left is the sum over what the schedule still holds.
Before the first preview its cost is estimated from the step time (``preview_hint``).

Host-independent: the run panel and the host's progress bar read ``RunClock.remaining``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

RECENT_STEPS = 50  # the step time is the mean of the last ones ...
RECENT_PREVIEWS = 3  # ... and so are a preview's and a save's


def preview_hint(settings: dict) -> float:
    """A preview's cost in training steps, before one was timed: ``preview_steps`` sampler steps, each a UNet
    forward on two latents (prompt and negative), against a training step's forward and backward (about three
    forwards) on ``batch_size x grad_accum`` latents, scaled by the pixel counts."""
    steps = int(settings.get("preview_steps") or 0)
    width, height = int(settings.get("width") or 512), int(settings.get("height") or 512)
    preview = int(settings.get("preview_width") or width) * int(settings.get("preview_height") or height)
    batch = max(int(settings.get("batch_size") or 1) * int(settings.get("grad_accum") or 1), 1)
    return steps * 2 * preview / (3 * batch * width * height)


def due(every: int, after: int, upto: int) -> int:
    """How many multiples of ``every`` lie in ``(after, upto]``."""
    return upto // every - after // every if every > 0 and upto > after else 0


@dataclass
class RunClock:
    """Fed the run's events with their arrival times; ``remaining()`` is the time left, or None before a step."""

    total: int
    start_step: int
    preview_every: int = 0
    save_every: int = 0
    hint_steps: float = 0.0  # a preview's cost in training steps until one is timed
    now: Callable[[], float] = time.monotonic
    step: int = 0
    mark: float = 0.0  # when the work in progress began (the end of the last step, save or preview)
    train: list[float] = field(default_factory=list)  # seconds of each step of this session
    saves: list[float] = field(default_factory=list)
    previews: list[float] = field(default_factory=list)
    done_at_step: set[str] = field(default_factory=set)  # "save" / "preview": done after the current step

    @classmethod
    def for_run(cls, settings: dict, total: int, start_step: int, now: Callable[[], float] = time.monotonic):
        return cls(total, start_step, int(settings.get("preview_every") or 0), int(settings.get("save_every") or 0),
                   preview_hint(settings), now, step=start_step, mark=now())

    # ------------------------------------------------------------------ events in
    def stepped(self, step: int) -> None:
        t = self.now()
        self.train.append(t - self.mark)
        self.step, self.mark = step, t
        self.done_at_step = set()

    def saved(self) -> None:
        t = self.now()
        self.saves.append(t - self.mark)
        self.mark = t
        self.done_at_step.add("save")

    def previewed(self) -> None:
        t = self.now()
        self.previews.append(t - self.mark)
        self.mark = t
        self.done_at_step.add("preview")

    # ------------------------------------------------------------------ estimate out
    def timing(self) -> dict[str, float | int | None]:
        """The measured costs the estimate uses (the status API shows them)."""
        step_s = self.step_seconds()
        return {"step_s": _rounded(step_s), "preview_s": _rounded(self.preview_seconds(step_s) if step_s else None),
                "previews_timed": len(self.previews), "save_s": _rounded(_recent_mean(self.saves, RECENT_PREVIEWS))}

    def step_seconds(self) -> float | None:
        """Mean seconds of the recent training steps (a machine shared with other work changes speed); the
        session's first step (warm-up, first allocations) left out once later steps exist."""
        return _recent_mean(self.train[1:] or self.train, RECENT_STEPS)

    def preview_seconds(self, step_s: float) -> float:
        timed = _recent_mean(self.previews, RECENT_PREVIEWS)
        return timed if timed is not None else self.hint_steps * step_s

    def remaining(self) -> float | None:
        """Seconds until the run ends: the work in progress, then every step, save and preview still due, and
        the final save."""
        step_s = self.step_seconds()
        if step_s is None:
            return None
        preview_s = self.preview_seconds(step_s)
        save_s = _recent_mean(self.saves, RECENT_PREVIEWS) or 0.0
        cost = {"save": save_s, "preview": preview_s}
        # In order: the current step's save and preview not done yet, the next step, ...
        queue = [cost[kind] for kind in ("save", "preview") if kind in self._due_after_step()]
        steps_left = self.total - self.step
        queue += [step_s] if steps_left else []
        # ... then the other steps left, with the saves and previews of their steps, and the final save.
        later = (max(steps_left - 1, 0) * step_s + due(self.save_every, self.step, self.total - 1) * save_s
                 + due(self.preview_every, self.step, self.total) * preview_s)
        if queue:
            later += save_s
        else:
            queue = [save_s]
        in_progress = max(queue[0] - (self.now() - self.mark), 0.0)
        return in_progress + sum(queue[1:]) + later

    def _due_after_step(self) -> set[str]:
        """The saves and previews the loop does after the current step and has not done yet (none at the step a
        resumed run starts from: its previous session did them)."""
        if self.step <= self.start_step:
            return set()
        out = set()
        if self.save_every > 0 and self.step % self.save_every == 0 and self.step < self.total:
            out.add("save")
        if self.preview_every > 0 and self.step % self.preview_every == 0:
            out.add("preview")
        return out - self.done_at_step


def _recent_mean(values: list[float], count: int) -> float | None:
    recent = values[-count:]
    return sum(recent) / len(recent) if recent else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
