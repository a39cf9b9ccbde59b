"""``python -m lib_ti demo``: a real result on a fresh machine, offline, on a CPU, in a few minutes.

It trains an embedding for the triangle on the shipped micro Stable Diffusion (a tiny SD1 model
the project pretrained on a synthetic shapes world, ``lib_ti/assets/micro-sd``), from five
images of triangles in mixed colours, starting from the neutral word "shape", with a progress bar. It
then renders prompts that put the new token in new colours, before (the init word) and after
training, and writes them as one grid. The same run, scored, is ``python -m lib_ti bench quality``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PREFIX, say


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train an embedding for a shape on the built-in micro model (offline, CPU, "
                          "about a minute) and write a before/after grid",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="outputs/demo", help="folder for the images, the run and the grid")
    demo.add_argument("--steps", type=int, default=500, help="training steps")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    # Heavy: torch and the model libraries.
    from ..micro import assets
    from ..micro.classifier import load_classifier
    from ..micro.quality import QualityConfig, StandaloneTarget, format_report, load_micro_engine, run_quality
    from .progress import ConsoleProgress

    model = str(assets.model_folder())
    cfg = QualityConfig(steps=args.steps, eval_every=args.steps, renders=8, out=args.out)
    classifier = load_classifier(assets.classifier_file())
    say(f"loading the micro model {model}")
    target = StandaloneTarget(load_micro_engine(model), model, on_event=ConsoleProgress())
    report = run_quality(target, classifier, cfg, progress=say)
    print(format_report(report))
    print(f"{PREFIX} demo done in {report['total_wall_s']:.0f}s.\n"
          f"  embedding: {report['embedding']}  (use '{cfg.token}' in a prompt)\n"
          f"  before/after grid: {report['grid']}\n"
          f"  training images: {Path(args.out) / 'images'}")
    return 0
