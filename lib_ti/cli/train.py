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

    cfg = config_from_args(args)
    check_paths(cfg)
    data = prepare_data(cfg)  # every data problem surfaces before the model loads
    device = choose_device(args.device)
    engine = load_engine(cfg.model, device, args.weights_dtype, args.model_config)
    return train_with_progress(engine, cfg, data, resume=args.resume)


def train_with_progress(engine, cfg, data, *, resume: bool) -> int:
    from ..trainer import train  # heavy: torch
    from .progress import ConsoleProgress

    stop = StopOnInterrupt()
    with ConsoleProgress() as progress:
        result = train(engine, cfg, data=data, resume=resume, on_event=progress, should_stop=stop)
    print(f"{PREFIX} {result.reason}. Embedding: {result.final_path}")
    if result.skipped_steps:
        print(f"{PREFIX} {result.skipped_steps} step(s) were skipped for a non-finite loss", file=sys.stderr)
    return 0


class StopOnInterrupt:
    """First Ctrl+C: finish the current step, save, exit. Second Ctrl+C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{PREFIX} stopping after this step and saving (Ctrl+C again to abort without saving)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested
