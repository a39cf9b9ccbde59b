"""``python -m lib_ti check | prepare | caption``: the dataset commands of the command line.

Each one is a thin shell over the function the webui tab calls (``preflight.check``,
``prepare.run``, ``caption.caption_folder``), plus a tqdm progress bar and the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..dataset.blip import DEFAULT_MODEL
from ..dataset.caption import CaptionOptions, caption_folder
from ..dataset.prepare import PrepareOptions
from ..dataset.prepare import run as prepare_folder
from ..errors import PREFIX
from ..families import NAMES
from .fields import add_field_arguments, add_train_arguments, config_from_args, given


def add_parser(sub) -> None:
    # Field flags state their defaults in their help (argparse's own default is None = "not given"),
    # so no ArgumentDefaultsHelpFormatter here: it would add "(default: None)" to each.
    _add_check(sub)
    _add_prepare(sub)
    _add_caption(sub)


def _add_check(sub) -> None:
    check = sub.add_parser("check", help="pre-flight check of a training config and its images (no model loaded)",
                           description="Check images, captions, templates, learning rate and memory before training. "
                                       "Exit code 0 when it can train, 1 when not (reasons printed).")
    add_train_arguments(check)
    check.add_argument("--family", choices=NAMES, help="model family for the memory estimate (default: read from "
                                                          "--model's files, else guessed from the resolution)")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    check.set_defaults(run=run_check)


def _add_prepare(sub) -> None:
    prepare = sub.add_parser("prepare", help="prepare training images into a new folder (crop, tile, flip, convert)",
                             description="Decode, convert, crop or tile, flip and de-duplicate the images of --src "
                                         "into PNGs in --dst, captions copied along. --src is never modified. Exit "
                                         "code 0 when at least one image was written.")
    add_field_arguments(prepare.add_argument_group("preparation"), PrepareOptions, required=("src", "dst"))
    prepare.set_defaults(run=run_prepare)


def _add_caption(sub) -> None:
    caption = sub.add_parser("caption", help="caption images with BLIP (local model only)",
                             description="Write <image>.txt captions with a BLIP captioning model from a local "
                                         "folder or the local Hugging Face cache; nothing is downloaded.")
    caption.add_argument("--data", required=True, help="folder of images to caption")
    caption.add_argument("--model", default=DEFAULT_MODEL, help="BLIP model folder, or a model id in the local "
                                                                f"Hugging Face cache (default: {DEFAULT_MODEL})")
    caption.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto = cuda when "
                                                          "available)")
    caption.add_argument("--max-new-tokens", type=int, default=40, help="longest caption, in tokens (default: 40)")
    caption.add_argument("--num-beams", type=int, default=3, help="beam search width, 1 = greedy and fastest "
                                                                  "(default: 3)")
    add_field_arguments(caption.add_argument_group("captions"), CaptionOptions)
    caption.set_defaults(run=run_caption)


def run_check(args: argparse.Namespace) -> int:
    from ..dataset.preflight import check  # imports torch when a run folder exists

    report = check(config_from_args(args), family=args.family)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format())
    return 0 if report.ok else 1


def run_prepare(args: argparse.Namespace) -> int:
    opts = PrepareOptions(**given(args, PrepareOptions))
    with _Bar("image") as bar:
        report = prepare_folder(opts, on_progress=bar.update)
    print(report.format())
    return 0 if report.written else 1


def run_caption(args: argparse.Namespace) -> int:
    from ..dataset.blip import load_blip  # heavy: torch, transformers
    from ..devices import choose_device

    opts = CaptionOptions(**given(args, CaptionOptions))
    device = str(choose_device(args.device))
    print(f"{PREFIX} loading BLIP {args.model} on {device}", file=sys.stderr)
    captioner = load_blip(args.model, device=device, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    with _Bar("image") as bar:
        report = caption_folder(args.data, captioner, opts, on_progress=bar.update)
    print(report.format())
    return 0


class _Bar:
    """A tqdm bar fed by the ``on_progress(done, total, path)`` callbacks of prepare and caption."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.bar: Any = None  # a tqdm bar, made once the total is known

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, done: int, total: int, path: Path) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit=self.unit, dynamic_ncols=True, file=sys.stderr)
        bar = self.bar
        bar.set_postfix_str(path.name[-30:], refresh=False)
        bar.update(done - bar.n)
