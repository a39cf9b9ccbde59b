"""The run's time left from its schedule (hosts.eta): what the run panel and the host's progress bar show."""

from __future__ import annotations

import pytest

from lib_ti.hosts.eta import RunClock, due, preview_hint

SETTINGS = {"preview_every": 20, "save_every": 20, "preview_steps": 8, "width": 64, "height": 64, "batch_size": 1,
            "grad_accum": 1}


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def simulate(clock: RunClock, now: FakeTime, total: int, step_s: float, preview_s: float, save_s: float,
             every: int = 20, start: int = 0):
    """Feeds ``clock`` a run's events (the trainer's loop order: step, save, preview; the final save last) and
    yields (step, estimated time left, actual time left) after each step's event."""
    timeline = []  # (event, cost)
    for step in range(start + 1, total + 1):
        timeline.append(("step", step, step_s))
        if step % every == 0 and step < total:
            timeline.append(("save", step, save_s))
        if step % every == 0:
            timeline.append(("preview", step, preview_s))
    timeline.append(("save", total, save_s))
    end = now.t + sum(cost for _, _, cost in timeline)
    for kind, step, cost in timeline:
        now.t += cost
        if kind == "step":
            clock.stepped(step)
            yield step, clock.remaining(), end - now.t
        elif kind == "save":
            clock.saved()
        else:
            clock.previewed()


def linear_eta(step: int, start: int, elapsed: float, total: int) -> float:
    """What the host's bar showed before: seconds per step since the start times the steps left."""
    return elapsed / (step - start) * (total - step)


def test_eta_counts_the_previews_and_saves_still_to_come():
    now = FakeTime()
    clock = RunClock.for_run(SETTINGS, 200, 0, now)
    assert clock.remaining() is None  # nothing timed yet: no ETA rather than a made-up one
    t0, worst_after_10pct, linear_at_10pct = now.t, 0.0, None
    for step, estimate, actual in simulate(clock, now, 200, step_s=0.1, preview_s=1.0, save_s=0.05):
        if step == 20:
            linear_at_10pct = linear_eta(step, 0, now.t - t0, 200)
            assert estimate == pytest.approx(actual, rel=0.2)  # the first preview only estimated
            assert linear_at_10pct < 0.7 * actual  # the bare extrapolation is far low here
        if step >= 20:
            worst_after_10pct = max(worst_after_10pct, abs(estimate - actual) / max(actual, 1e-9))
        if step > 20:  # a preview and a save timed: exact on a steady machine
            assert estimate == pytest.approx(actual, rel=1e-6, abs=1e-6), step
    assert worst_after_10pct <= 0.2 and linear_at_10pct is not None


def test_a_preview_in_progress_counts_down():
    now = FakeTime()
    clock = RunClock.for_run(SETTINGS, 100, 0, now)
    for step in range(1, 41):
        now.t += 0.1
        clock.stepped(step)
        if step == 20:
            clock.saved()
            now.t += 1.0
            clock.previewed()
    clock.saved()  # the save of step 40; its preview is under way
    before = clock.remaining()
    now.t += 0.6
    assert clock.remaining() == pytest.approx(before - 0.6)
    now.t += 5.0  # longer than any preview so far: the preview part is spent, the rest stays
    assert clock.remaining() == pytest.approx(60 * 0.1 + 3 * 1.0 + 2 * clock.saves[-1] + 0.0, rel=1e-6)


def test_a_resumed_run_owes_nothing_for_the_step_it_starts_from():
    now = FakeTime()
    clock = RunClock.for_run(SETTINGS, 100, 40, now)
    estimates = list(simulate(clock, now, 100, step_s=0.2, preview_s=2.0, save_s=0.1, start=40))
    step, estimate, actual = estimates[-1]
    assert step == 100 and estimate == pytest.approx(actual)
    assert [s for s, _, _ in estimates][0] == 41


def test_the_first_step_warm_up_does_not_set_the_pace():
    now = FakeTime()
    clock = RunClock.for_run({"preview_every": 0, "save_every": 0}, 100, 0, now)
    now.t += 5.0  # the first step: allocations, autograd's first graph
    clock.stepped(1)
    assert clock.remaining() == pytest.approx(99 * 5.0)  # one step known: it is all there is
    for step in range(2, 11):
        now.t += 0.1
        clock.stepped(step)
    assert clock.remaining() == pytest.approx(90 * 0.1)


def test_preview_hint_scales_with_sampler_steps_size_and_batch():
    assert preview_hint(SETTINGS) == pytest.approx(8 * 2 / 3)
    assert preview_hint({**SETTINGS, "preview_width": 128, "preview_height": 128}) == pytest.approx(4 * 8 * 2 / 3)
    assert preview_hint({**SETTINGS, "batch_size": 2, "grad_accum": 2}) == pytest.approx(8 * 2 / 3 / 4)
    assert preview_hint({**SETTINGS, "preview_steps": 0}) == 0
    assert (due(20, 0, 200), due(20, 20, 199), due(0, 0, 100), due(20, 100, 100)) == (10, 8, 0, 0)
