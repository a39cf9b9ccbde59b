"""The webui's GPU queue, job state and progress bar: what every A1111-style webui shares.

A1111, reForge and Forge all keep ``modules.call_queue`` (the queue lock and the GPU-call wrapper),
``modules.progress`` (task ids the page polls) and ``shared.state`` (job counters, the interrupt and
skip flags, the live preview); a run holds the lock and reports into the state like a generation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

JOB_FIELDS = ("job", "job_no", "job_count", "textinfo", "sampling_step", "sampling_steps",
              "processing_has_refined_job_count", "time_start")
STOP_FLAGS = ("interrupted", "skipped", "stopping_generation")

# The host's progress bar (/internal/progress) shows job_no / job_count and an ETA it extrapolates from
# shared.state.time_start over the whole job, data loading and the steps a resumed run had already done
# included, and blind to the previews and saves still to come. ``progress_eta`` sets time_start so that
# the host's ETA is the run's own (``eta.RunClock``); the runner calls it every half second.
_clock: dict[str, float] = {}


def progress_text(name: str, step: int, total: int) -> str:
    """Plain text the host's bar shows before its percentage (never HTML: it shows text, not markup)."""
    return f"Training {name}: step {step}/{total}"


def host_progress(state) -> float:
    """The host's own progress fraction (modules/progress.py progressapi, v1.10.1): a preview render's
    sampling steps count as a part of one training step."""
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
        if state.sampling_steps > 0:
            progress += state.sampling_step / state.sampling_steps / state.job_count
    return min(progress, 1.0)


def host_time_start(now: float, eta: float, progress: float) -> float | None:
    """The ``time_start`` for which the host's ETA, elapsed * (1 - p) / p, equals ``eta``."""
    if not 0 < progress < 1:
        return None
    return now - eta * progress / (1 - progress)


def progress_begin(total_steps: int, start_step: int, name: str = "") -> None:
    from modules import shared

    _clock.update(job_start=shared.state.time_start or time.time())
    # No fraction before the run's first step: the host would show an ETA of 0 s for a resumed run (its
    # steps done over a just-begun job); the text names the step.
    shared.state.job_count, shared.state.job_no = 0, 0
    shared.state.sampling_step = shared.state.sampling_steps = 0
    shared.state.textinfo = progress_text(name, start_step, total_steps)


def progress_step(step: int, total_steps: int, name: str = "") -> None:
    from modules import shared

    shared.state.job_count, shared.state.job_no = total_steps, step
    shared.state.textinfo = progress_text(name, step, total_steps)


def progress_eta(eta: float | None) -> None:
    """The host's bar shows ``eta`` seconds left (no ETA of ours yet: the host's own)."""
    if not _clock or eta is None:
        return
    from modules import shared

    start = host_time_start(time.time(), eta, host_progress(shared.state))
    if start is not None:
        shared.state.time_start = start


def progress_end() -> None:
    """The host logs the job's duration from time_start: give it back the real start."""
    if not _clock:
        return
    from modules import shared

    shared.state.time_start = _clock.pop("job_start")
    _clock.clear()


def progress_image(image) -> None:
    from modules import shared

    shared.state.assign_current_image(image)


def progress_count(done: int, total: int, _path=None) -> None:
    """Progress of a prepare/caption job in the host's job state (the tab's progress, /sdapi/v1/progress)."""
    from modules import shared

    shared.state.job_count, shared.state.job_no = total, done


def host_interrupted() -> bool:
    """The host's Interrupt (first click: "stop after this image", second: now), Skip, and /sdapi/v1/interrupt
    all stop a run at the next step like our Stop button: a training run has no "current image" to finish."""
    from modules import shared

    return any(bool(getattr(shared.state, flag, False)) for flag in STOP_FLAGS)


@contextlib.contextmanager
def gpu_job(task_id: str) -> Iterator[None]:
    """What the host's wrap_gradio_gpu_call does for the tab, for runs started from the API: hold the GPU
    queue lock (no collision with a generation) and register the task so progress polling works."""
    from modules import call_queue, progress, shared

    progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        shared.state.begin(job=task_id)
        progress.start_task(task_id)
        try:
            yield
        finally:
            progress.finish_task(task_id)
            shared.state.end()
            shared.state.interrupted = False


def wrap_gpu_call(fn, extra_outputs: list):
    from modules.call_queue import wrap_gradio_gpu_call

    return wrap_gradio_gpu_call(fn, extra_outputs=extra_outputs)


def computes_on_cpu() -> bool:
    """Whether the host computes on the CPU (--use-cpu all, or no GPU): memory estimates then speak of RAM."""
    from modules import devices

    return getattr(devices.device, "type", "cpu") == "cpu"


@contextlib.contextmanager
def job_state_kept(state) -> Iterator[None]:
    """A preview render runs the host's txt2img, which rewrites the job fields of ``shared.state`` and
    clears its Skip flag at the start of each image: a stop request made before or during the render
    must still stop the run after it."""
    saved = {k: getattr(state, k, None) for k in JOB_FIELDS}
    flags = {k: bool(getattr(state, k, False)) for k in STOP_FLAGS}
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(state, k, v)
        for k, was_set in flags.items():
            setattr(state, k, was_set or bool(getattr(state, k, False)))


class _SilentTotal:
    """Stands in for the host's console "Total progress" bar during a preview render: that bar's total is
    job_count x sampling steps, i.e. training steps x preview steps, and would spill into the next txt2img."""

    def update(self) -> None:
        pass

    def updateTotal(self, new_total) -> None:  # noqa: N802 - the host's method name
        pass

    def reset(self) -> None:
        pass

    def clear(self) -> None:
        pass


@contextlib.contextmanager
def quiet_total_progress(shared) -> Iterator[None]:
    saved = getattr(shared, "total_tqdm", None)
    shared.total_tqdm = _SilentTotal()
    try:
        yield
    finally:
        shared.total_tqdm = saved
