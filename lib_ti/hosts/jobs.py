"""One training job as a UI or an API client sees it: status, loss history, previews, stop requests.

Host-independent: the webui glue feeds it the trainer's events and reads back a status dict (API),
an HTML summary with a loss chart (the tab's run panel) and the preview list (gallery).
"""

from __future__ import annotations

import html
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import events
from ..errors import TIError
from .eta import RunClock


@dataclass
class Job:
    run_id: str
    name: str
    task_id: str = ""  # the host's progress task (/internal/progress) the run holds the GPU queue lock under
    settings: dict[str, Any] = field(default_factory=dict)  # the run's config, as the run panel shows it
    total_steps: int = 0
    state: str = "queued"  # queued | running | stopping | finished | stopped | failed
    step: int = 0
    lr: float | None = None
    images_per_s: float = 0.0
    clock: RunClock | None = field(default=None, repr=False)  # the time left, from the run's schedule
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[tuple[int, Path]] = field(default_factory=list)
    saved: list[tuple[int, Path]] = field(default_factory=list)
    published: list[Path] = field(default_factory=list)  # copies in the host's embeddings folder
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    error_detail: str | None = None
    result: str | None = None
    final_path: Path | None = None
    lora_path: Path | None = None  # pivotal runs: the LoRA published in the host's Lora folder
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    # ------------------------------------------------------------------ control
    def request_stop(self) -> None:
        """Finish the current step, save, and end (the trainer checks between steps)."""
        self._stop.set()
        if self.state in ("queued", "running"):
            self.state = "stopping"

    def should_stop(self) -> bool:
        return self._stop.is_set()

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "stopping")

    @property
    def eta_s(self) -> float | None:
        """Seconds left while the run trains (steps, saves and previews to come), else None."""
        if self.clock is None or self.state not in ("running", "stopping"):
            return None
        return self.clock.remaining()

    # ------------------------------------------------------------------ events in
    def handle(self, event: object) -> None:
        if isinstance(event, events.Started):
            self.state = "stopping" if self._stop.is_set() else "running"
            self.step, self.total_steps, self.notes = event.start_step, event.total_steps, list(event.notes)
            self.clock = RunClock.for_run(self.settings, event.total_steps, event.start_step)
        elif isinstance(event, events.Step):
            self.step, self.total_steps, self.lr = event.step, event.total_steps, event.lr
            self.images_per_s = event.images_per_s
            if self.clock is not None:
                self.clock.stepped(event.step)
            if event.loss is not None:
                self.losses.append((event.step, event.loss))
        elif isinstance(event, events.Saved):
            self.saved.append((event.step, Path(event.path)))
            if self.clock is not None:
                self.clock.saved()
        elif isinstance(event, events.Preview):
            self.previews.append((event.step, Path(event.path)))
            if self.clock is not None:
                self.clock.previewed()
        elif isinstance(event, events.Warning):
            self.warnings.append(event.message)
        elif isinstance(event, events.Result):
            self.result, self.final_path = event.reason, event.final_path

    def finish(self, stopped: bool) -> None:
        self.state = "stopped" if stopped else "finished"
        self.ended_at = time.time()

    def fail(self, exc: BaseException) -> None:
        """The real error, for the tab and the API: never "finished" with nothing done."""
        self.state = "failed"
        self.error = str(exc) if isinstance(exc, TIError) else f"{type(exc).__name__}: {exc}"
        # A user error's message is the whole story; a traceback (with the errors it chains) is for bugs.
        self.error_detail = None if isinstance(exc, TIError) else "".join(traceback.format_exception(exc))
        self.ended_at = time.time()

    # ------------------------------------------------------------------ views out
    def status(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "task_id": self.task_id, "name": self.name, "state": self.state,
            "active": self.active, "step": self.step,
            "total_steps": self.total_steps, "loss": self.losses[-1][1] if self.losses else None,
            "learning_rate": self.lr, "images_per_s": round(self.images_per_s, 3),
            "eta_s": None if (eta := self.eta_s) is None else round(eta, 1),
            "timing": self.clock.timing() if self.clock is not None else None,
            "last_preview": str(self.previews[-1][1]) if self.previews else None,
            "saved": [str(p) for _, p in self.saved], "published": [str(p) for p in self.published],
            "final_path": str(self.final_path) if self.final_path else None,
            "lora_path": str(self.lora_path) if self.lora_path else None,
            "warnings": list(self.warnings), "notes": list(self.notes), "error": self.error,
            "error_detail": self.error_detail,
            "result": self.result, "started_at": self.started_at, "ended_at": self.ended_at,
        }

    def summary_html(self) -> str:
        """Step, loss, learning rate and ETA, with the loss chart: the tab's run panel (never the host's bar)."""
        loss = f"{self.losses[-1][1]:.4f}" if self.losses else "-"
        lr = f"{self.lr:g}" if self.lr is not None else "-"
        eta = _duration(left) if (left := self.eta_s) is not None else "-"
        rows = [("Embedding", self.name), ("Step", f"{self.step} / {self.total_steps}"), ("Loss", loss),
                ("Learning rate", lr), ("Images/s", f"{self.images_per_s:.2f}"), ("ETA", eta)]
        if self.saved:
            rows.append(("Last saved", self.saved[-1][1].name))
        table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        notes = "".join(f"<p class='ti-trainer-note'>{html.escape(n)}</p>" for n in self.notes + self.warnings[-3:])
        return f"<div class='ti-trainer-summary'><table>{table}</table>{loss_chart_svg(self.losses)}{notes}</div>"

    def outcome_html(self) -> str:
        if self.state == "failed":
            return f"<div class='ti-trainer-error error'>{html.escape(self.error or 'training failed')}</div>"
        where = f" Embedding: {self.final_path}" if self.final_path else ""
        if self.lora_path is not None:  # both files are the result: the prompt needs the name and the LoRA
            where += f" LoRA: {self.lora_path} (prompt: {self.name} <lora:{self.lora_path.stem}:1>)"
        return f"<p>{html.escape((self.result or self.state) + '.' + where)}</p>"


def loss_chart_svg(points: list[tuple[int, float]], width: int = 360, height: int = 120) -> str:
    """A dependency-free line chart of (step, loss); empty until two points exist."""
    pts = [(s, v) for s, v in points if v == v and abs(v) != float("inf")]
    if len(pts) < 2:
        return ""
    pad = 28
    s0, s1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    span_s, span_v = max(s1 - s0, 1), max(hi - lo, 1e-12)

    def xy(s: int, v: float) -> str:
        x = pad + (s - s0) / span_s * (width - pad - 4)
        y = 4 + (hi - v) / span_v * (height - pad)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in pts)
    axis_y = height - pad + 4
    return (
        f"<svg class='ti-trainer-chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        "xmlns='http://www.w3.org/2000/svg' role='img' aria-label='loss by step'>"
        f"<polyline fill='none' stroke='currentColor' stroke-width='1.5' points='{line}'/>"
        f"<line x1='{pad}' y1='{axis_y}' x2='{width - 4}' y2='{axis_y}' stroke='gray'/>"
        f"<text x='0' y='12' font-size='10' fill='gray'>{hi:.3g}</text>"
        f"<text x='0' y='{axis_y}' font-size='10' fill='gray'>{lo:.3g}</text>"
        f"<text x='{pad}' y='{height - 4}' font-size='10' fill='gray'>step {s0}</text>"
        f"<text x='{width - 4}' y='{height - 4}' font-size='10' fill='gray' text-anchor='end'>{s1}</text></svg>"
    )


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
