"""Headless command line: ``python -m lib_ti {train,check,prepare,caption,inspect,bench,demo} ...``.

This module only dispatches: each command is a module of this package with ``add_parser(sub)``
and a ``run`` function. The commands import torch and the model libraries when they run, not
when the parser is built, so ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import TIError
from . import bench, dataset, demo, inspect, train


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_ti", description="Textual Inversion trainer (headless).")
    sub = parser.add_subparsers(title="commands")
    for command in (train, inspect, dataset, bench, demo):
        command.add_parser(sub)
    return parser
