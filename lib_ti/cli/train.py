"""``python -m lib_ti train``: train an embedding on a model from disk, with a console progress bar."""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import PREFIX
from .fields import add_train_arguments, config_from_args


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train an embedding", description="Train a Textual Inversion embedding.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(train)
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Heavy: torch and the model libraries load only once a run really starts.
    from ..config import check_paths
    from ..data import prepare_data
    from ..devices import choose_device
    from ..engines.standalone import load_engine
    from ..runfolder import check_run

    with StopOnSignal() as stop:  # until training starts, a signal aborts at once: there is nothing to save yet
        cfg = config_from_args(args)
        check_paths(cfg)
        check_run(cfg, resume=args.resume)
        data = prepare_data(cfg)  # every data problem surfaces before the model loads
        device = choose_device(args.device)
        engine = load_engine(cfg.model, device, args.weights_dtype, args.model_config, cfg.precision)
        return train_with_progress(engine, cfg, data, resume=args.resume, stop=stop)


def train_with_progress(engine, cfg, data, *, resume: bool, stop: StopOnSignal) -> int:
    """Train with a progress bar; the exit code is 0, or 128 + the signal number when a signal stopped the run."""
    from .. import events
    from ..trainer import train  # heavy: torch
    from .progress import ConsoleProgress

    with ConsoleProgress() as progress:
        def on_event(event: object) -> None:
            if isinstance(event, events.Started):
                stop.graceful = True  # from here on a signal finishes the step and saves
            progress(event)

        result = train(engine, cfg, data=data, resume=resume, on_event=on_event, should_stop=stop)
    lora = f"; LoRA: {result.lora_path}" if result.lora_path is not None else ""
    print(f"{PREFIX} {result.reason}. Embedding: {result.final_path}{lora}")
    if result.skipped_steps:
        print(f"{PREFIX} {result.skipped_steps} step(s) were skipped for a non-finite loss", file=sys.stderr)
    return 128 + stop.signum if stop.signum and result.stopped_early else 0


class Aborted(KeyboardInterrupt):
    """A signal that ends the process now, without saving (before training starts, or a second one)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """Ctrl+C (SIGINT) and SIGTERM (container stop, systemd, job schedulers): the first one finishes the current
    step, saves and exits 130 / 143; a second one, or one before training starts, aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.graceful = False
        self.previous: list = []

    def __enter__(self) -> StopOnSignal:
        self.previous = [signal.signal(signum, self._handle) for signum in self.SIGNALS]
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in zip(self.SIGNALS, self.previous, strict=True):
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum or not self.graceful:
            raise Aborted(signum)
        self.signum = signum
        print(f"\n{PREFIX} stopping after this step and saving ({signal.Signals(signum).name}; send it again to "
              "abort without saving)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return bool(self.signum)
