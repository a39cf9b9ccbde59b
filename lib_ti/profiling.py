"""Opt-in profile of a few training steps, for finding where a step's time goes (issue 15: inside a host
the same step can be slower than headless). ``TI_TRAINER_PROFILE=N`` in the environment of the process
that trains (the webui's too) profiles steps 3 to 2 + N with ``torch.profiler`` and writes the table of
operators by self CPU time to ``<run folder>/profile.txt`` (or ``TI_TRAINER_PROFILE_OUT``). Off (no cost) when the variable is unset."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FIRST_STEP = 3  # steps 1-2 warm up (allocator, oneDNN primitive caches)


class StepProfiler:
    def __init__(self, run_dir: Path) -> None:
        self.steps = int(os.environ.get("TI_TRAINER_PROFILE") or 0)
        self.path = Path(os.environ.get("TI_TRAINER_PROFILE_OUT") or run_dir / "profile.txt")
        self.profile: torch.profiler.profile | None = None

    def before(self, step: int) -> None:
        """Call before step ``step`` (1-based) runs."""
        if self.steps and step == FIRST_STEP:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()

    def after(self, step: int) -> None:
        """Call after step ``step`` ran."""
        if self.profile is not None and step == FIRST_STEP + self.steps - 1:
            self.profile.__exit__(None, None, None)
            table = self.profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
            self.path.write_text(f"threads {torch.get_num_threads()}, steps {FIRST_STEP}-{step}\n{table}\n")
            self.profile = None
