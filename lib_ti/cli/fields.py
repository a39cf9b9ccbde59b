"""Command-line flags generated from the typed option dataclasses (``TrainConfig``, ``PrepareOptions``, ...).

Each field's flag, type, choices and help come from the field itself, so a new option needs no
command-line code; unset flags stay None, so a config file's values survive flags not given.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, Field, fields
from typing import Any

from ..config import TrainConfig
from ..options import field_help


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``train`` (and ``check``): the run's own options, then one flag per config key."""
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="YAML or JSON config file; flags given here override it")
    run.add_argument(
        "--resume", action="store_true", help="continue the run in the output folder from its last checkpoint"
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda when available)")
    run.add_argument("--weights-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="dtype the frozen UNet and text encoders load in (auto: the precision's)")
    run.add_argument(
        "--model-config", help="single-file checkpoints: a local diffusers folder with the component configs"
    )
    group = parser.add_argument_group("training config (every key of the config file)")
    add_field_arguments(group, TrainConfig)


def add_field_arguments(group: Any, cls: type, required: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls``, typed from its annotation; unset flags stay None."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]
        text = field_help(f) if f.name in required else f"{field_help(f)} (default: {_default(f)!r})"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": None,
            "help": text.replace("%", "%%"),
        }  # argparse formats %
        if f.name in required:
            kwargs["required"] = True
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


def _default(f: Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file's values, then the flags given; with --resume, the run's own config with those changes."""
    values = {**(TrainConfig.read_file(args.config) if args.config else {}), **given(args, TrainConfig)}
    if not getattr(args, "resume", False):
        return TrainConfig.from_dict(values)
    from ..checkpoints import saved_config  # heavy: torch

    where = TrainConfig.from_dict({k: values[k] for k in ("name", "output_dir") if k in values})
    return saved_config(where.run_dir, where.name).resumed(values)[0]  # the run reports the changes as notes
