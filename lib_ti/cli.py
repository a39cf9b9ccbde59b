"""Headless command line: ``python -m lib_ti {train,check,prepare,caption,inspect,bench,demo} ...``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import typing
from dataclasses import MISSING, fields

from .config import HELP, TrainConfig, check_paths
from .errors import PREFIX, TIError

# Flags that have a shorter, friendlier spelling on the command line.
ALIASES = {"data_dir": ["--data"]}


def main(argv: list[str] | None = None) -> int:
    # transformers logs advice for its own users at import (e.g. "requires torchvision"); errors still show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except TIError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_ti", description="Textual Inversion trainer (headless).")
    sub = parser.add_subparsers(title="commands")
    train = sub.add_parser("train", help="train an embedding", description="Train a Textual Inversion embedding.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(train)
    train.set_defaults(run=run_train)
    from . import inspect_cmd

    inspect = sub.add_parser("inspect", help="show or convert an embedding file",
                             description="Print what an embedding file holds; convert it with --to.")
    inspect_cmd.add_arguments(inspect)
    inspect.set_defaults(run=inspect_cmd.run)
    from . import bench, dataset_cli, demo

    dataset_cli.add_parsers(sub)
    bench.add_parser(sub)
    demo.add_parser(sub)
    return parser


# ---------------------------------------------------------------------- train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="YAML or JSON config file; flags given here override it")
    run.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda when available)")
    run.add_argument("--weights-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="dtype of the frozen UNet and text encoders (auto = fp16 on GPU, fp32 on CPU)")
    run.add_argument("--model-config", help="single-file checkpoints: a local diffusers folder with the component configs")
    group = parser.add_argument_group("training config (every key of the config file)")
    add_field_arguments(group, TrainConfig, HELP, ALIASES)


def add_field_arguments(group, cls: type, help_texts: dict[str, str], aliases: dict[str, list[str]] | None = None,
                        required: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls``, typed from its annotation; unset flags stay None."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flags = [f"--{f.name.replace('_', '-')}", *(aliases or {}).get(f.name, [])]
        kwargs: dict = dict(dest=f.name, default=None, help=help_texts[f.name])
        if f.name in required:
            kwargs["required"] = True
        else:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            kwargs["help"] += f" (default: {default!r})"
        hint = hints[f.name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif typing.get_origin(hint) is list:
            kwargs["nargs"] = "*"
        else:
            kwargs["type"] = hint
        group.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    return cfg.replace(**given) if given else cfg


def run_train(args: argparse.Namespace) -> int:
    import torch

    from .data import prepare_data

    cfg = config_from_args(args)
    check_paths(cfg)
    data = prepare_data(cfg)  # every data problem surfaces before the model loads
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    engine = load_engine(cfg.model, device, args.weights_dtype, args.model_config)
    return train_with_progress(engine, cfg, data, resume=args.resume)


def load_engine(model: str, device, weights_dtype: str = "auto", model_config: str | None = None):
    import torch

    from .engines.standalone import StandaloneEngine

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes.get(weights_dtype) or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    print(f"{PREFIX} loading {model} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    return StandaloneEngine.load(model, device=device, dtype=dtype, config_dir=model_config)


def train_with_progress(engine, cfg: TrainConfig, data, *, resume: bool) -> int:
    from .progress import ConsoleProgress
    from .trainer import train

    stop = _StopOnInterrupt()
    with ConsoleProgress() as progress:
        result = train(engine, cfg, data=data, resume=resume, on_event=progress, should_stop=stop)
    print(f"{PREFIX} {result.reason}. Embedding: {result.final_path}")
    if result.skipped_steps:
        print(f"{PREFIX} {result.skipped_steps} step(s) were skipped for a non-finite loss", file=sys.stderr)
    return 0


class _StopOnInterrupt:
    """First Ctrl+C: finish the current step, save, exit. Second Ctrl+C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{PREFIX} stopping after this step and saving (Ctrl+C again to abort without saving)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested
