"""Headless command line: ``python -m lib_ti {train,check,prepare,caption,inspect,bench,demo,score} ...``.

This module only dispatches: each command is a module of this package with ``add_parser(sub)``
and a ``run`` function. The commands import torch and the model libraries when they run, not
when the parser is built, so ``--help`` and argument errors stay fast.

Exit codes: 0 done; 1 a check or inspection found a problem; 2 a bad input or a failure, one
``[TI Trainer]`` line naming it; 128 + the signal (130 Ctrl+C, 143 SIGTERM) when a signal ended
the command, also when ``train`` stopped on it and saved.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import PREFIX, TIError
from . import bench, dataset, demo, inspect, score, train


def main(argv: list[str] | None = None) -> int:
    # transformers logs advice for its own users at import (e.g. "requires torchvision"); errors still show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except TIError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl+C, or a second signal during a run: no traceback, the shell's code
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"\n{PREFIX} interrupted ({signal.Signals(signum).name}): stopped without saving; what was saved "
              "before is kept", file=sys.stderr)
        return 128 + signum


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_ti", description="Textual Inversion trainer (headless).")
    sub = parser.add_subparsers(title="commands")
    for command in (train, inspect, dataset, bench, demo, score):
        command.add_parser(sub)
    return parser
