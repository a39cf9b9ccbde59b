"""``python -m lib_ti bench speed | quality``: the benchmarks' command line.

The measurements live in ``lib_ti.bench.speed`` and ``lib_ti.micro.quality``; here are their flags,
the choice of engine, and the console output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import TIError, say

# Who runs the quality benchmark's loop: this process, a running webui with this extension, or that webui's own
# built-in trainer (the yardstick to beat).
ENGINES = ("standalone", "webui", "webui-builtin")


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks of the trainer.")
    kinds = bench.add_subparsers(title="benchmarks")
    _add_speed(kinds)
    _add_suite(kinds)
    _add_quality(kinds)


# ---------------------------------------------------------------------- bench speed
def _add_speed(kinds) -> None:
    from ..bench.speed import COMPILE_MODES, REAL_ARCHES, REPRODUCTIONS, TINY_ARCHES, SpeedSettings

    d = SpeedSettings()
    speed = kinds.add_parser("speed", help="time training steps (steps/s, images/s, peak memory, time to first step)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = speed.add_mutually_exclusive_group()
    source.add_argument("--model", default=d.model, help="a diffusers folder or single-file checkpoint to benchmark")
    source.add_argument("--arch", default=d.arch, choices=TINY_ARCHES + REAL_ARCHES,
                        help="a built-in model with random weights: tiny-* (seconds to build) or the real "
                             "architectures sd15/sd21/sdxl at full size (random weights)")
    speed.add_argument("--resolution", type=int, default=d.resolution, help="training resolution in pixels (square)")
    speed.add_argument("--batch-size", type=int, default=d.batch_size)
    speed.add_argument("--steps", type=int, default=d.steps, help="timed steps (the protocol uses 200 on a GPU)")
    speed.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before the timed window")
    speed.add_argument("--vectors", type=int, default=d.vectors, help="vectors per token")
    speed.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "fp16", "bf16"])
    speed.add_argument("--gradient-checkpointing", action="store_true")
    speed.add_argument("--device", default=d.device)
    speed.add_argument("--weights", default=d.weights, choices=["auto", "fp32", "fp16", "bf16"],
                       help="the dtype the frozen weights load in (auto: the precision's)")
    speed.add_argument("--compile", default=d.compile, choices=COMPILE_MODES[1:],
                       help="torch.compile the UNet with this mode (default: eager)")
    speed.add_argument("--reproduce", default=d.reproduce, choices=REPRODUCTIONS[1:],
                       help="builtin: time a reproduction of the webui's built-in trainer's step instead (UNet "
                            "weight grads, gradient checkpointing), for a ratio where the webui cannot run")
    speed.add_argument("--limits", action="store_true",
                       help="also count the step's matrix products (one more, untimed step) and print this device's "
                            "floors for them: at the square-matmul peak and at the rates it reaches for the step's "
                            "own GEMM shapes (takes a few seconds to a minute more)")
    speed.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    webui = speed.add_argument_group("in a running webui (--engine webui)")
    webui.add_argument("--engine", default="standalone", choices=ENGINES,
                       help="standalone: time this process; webui: time runs inside a running webui (started with "
                            "--api) on the checkpoint it has loaded")
    webui.add_argument("--vs", default="", choices=["builtin"],
                       help="--engine webui: pair each of our runs with one of the webui's own built-in trainer at "
                            "equal settings, and print the ratio")
    webui.add_argument("--webui-url", default="http://127.0.0.1:7860")
    webui.add_argument("--webui-auth", help="user:password if the webui uses --api-auth")
    webui.add_argument("--data", default="", help="--engine webui: a folder of images on the webui's machine that "
                       "its requests may read")
    webui.add_argument("--pairs", type=int, default=2, help="--engine webui: runs of each trainer, interleaved")
    webui.add_argument("--webui-pid", type=int, default=0,
                       help="--engine webui: the webui's process, for its peak RSS (default: found from the port)")
    speed.set_defaults(run=run_speed)


def run_speed(args: argparse.Namespace) -> int:
    if args.engine == "webui" and args.limits:
        raise TIError("bench speed --limits counts a headless step: leave out --engine webui (the same "
                      "architecture and resolution headless give the floors)")
    if args.engine == "webui":
        return _run_webui_speed(args)
    from ..bench import speed  # heavy: torch

    settings = speed.SpeedSettings(
        model=args.model, arch=args.arch, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
        warmup=args.warmup, vectors=args.vectors, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, device=args.device, weights=args.weights,
        compile=args.compile, reproduce=args.reproduce, limits=args.limits)
    figures = speed.run(settings)
    print(speed.format_report(figures))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _run_webui_speed(args: argparse.Namespace) -> int:
    from ..bench import webui_speed

    settings = webui_speed.WebuiSpeedSettings(
        url=args.webui_url, auth=args.webui_auth, data_dir=args.data, resolution=args.resolution, steps=args.steps,
        warmup=args.warmup, vectors=args.vectors, pairs=args.pairs, precision=args.precision, vs=args.vs,
        pid=args.webui_pid)
    report = webui_speed.run(settings, progress=say)
    print(webui_speed.format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------- bench suite
def _add_suite(kinds) -> None:
    suite = kinds.add_parser("suite", help="a matrix of bench speed runs (precisions, batch sizes, checkpointing, "
                             "torch.compile, the built-in's step) as one table with useful MFU",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    suite.add_argument("--preset", default="gpu", choices=["gpu", "cpu"],
                       help="gpu: SD1.5-size and SDXL-size random-weight models; cpu: the same on tiny models")
    suite.add_argument("--budget", type=float, default=450, help="seconds for the whole suite; rows that no longer "
                       "fit are listed as not run")
    suite.add_argument("--row-timeout", type=float, default=150, help="seconds one row may take (a compile that "
                       "hangs stops there)")
    suite.add_argument("--only", type=int, nargs="+", help="run only these rows of the preset (1-based)")
    suite.add_argument("--out", default="bench-suite", help="folder for suite.md, suite.json and each row's JSON")
    suite.set_defaults(run=run_suite)


def run_suite(args: argparse.Namespace) -> int:
    from ..bench import suite  # heavy: torch

    print(suite.run(args.preset, Path(args.out), budget_s=args.budget, row_timeout_s=args.row_timeout,
                     only=args.only))
    return 0


# ---------------------------------------------------------------------- bench quality
def _add_quality(kinds) -> None:
    from ..micro.quality import QualityConfig
    from ..micro.shapes import SHAPES

    d = QualityConfig()
    quality = kinds.add_parser("quality", help="train an embedding on the micro model and score renders of it "
                               "(shape accuracy per step, colour-follows-prompt, init-word baseline)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    quality.add_argument("--engine", default="standalone", choices=ENGINES,
                         help="who runs the loop: this process (standalone), a running webui with this extension "
                              "(webui), or that webui's own Train-tab trainer at its defaults (webui-builtin; the "
                              "webui must run on this machine)")
    quality.add_argument("--webui-url", default="http://127.0.0.1:7860",
                         help="--engine webui*: the webui (started with --api)")
    quality.add_argument("--webui-auth", help="--engine webui*: user:password if the webui uses --api-auth")
    quality.add_argument(
        "--model", help="a micro-world model: diffusers folder or single file (default: the shipped one)"
    )
    quality.add_argument("--classifier", help="the shapes classifier (default: the shipped one)")
    quality.add_argument("--clip", nargs="?", const="micro", metavar="DIR",
                         help="also score the renders with a CLIP model (fidelity, editability) and report their rank "
                              "correlation with the classifier's figures; bare --clip or 'micro': the shipped micro "
                              "CLIP (lib_ti/assets/micro-clip)")
    quality.add_argument("--concept", default=d.concept, choices=SHAPES)
    quality.add_argument("--init-text", default=d.init_text)
    for name in ("num_images", "steps", "eval_every", "renders", "sampler_steps", "seed"):
        quality.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    quality.add_argument("--eval-at", type=_steps_list, default=(), metavar="STEP,STEP,...",
                         help="score only these checkpoints (multiples of --eval-every), e.g. 25,50,100,300,1000; "
                              "default: every --eval-every steps")
    quality.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    quality.add_argument("--threads", type=int, default=1,
                         help="torch CPU threads (1: the micro model's tensors are too small to split between cores)")
    quality.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                         help="a trainer setting other than its default, to compare (repeatable; VALUE is read as "
                         "YAML): e.g. --train-set template=captions --train-set learning_rate=0.002")
    quality.add_argument("--out", default=d.out, help="folder for the images, the run, grid.png and report.json")
    quality.add_argument("--json", dest="json_out", help="also copy report.json here")
    quality.set_defaults(run=run_quality)


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of steps: give e.g. 25,50,100") from None


def run_quality(args: argparse.Namespace) -> int:
    # Heavy: torch and the model libraries.
    from ..micro import assets, quality
    from ..micro.classifier import load_classifier

    cfg = quality.QualityConfig(
        concept=args.concept, init_text=args.init_text, num_images=args.num_images, steps=args.steps,
        eval_every=args.eval_every, eval_at=args.eval_at, renders=args.renders, sampler_steps=args.sampler_steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed, out=args.out, train_settings=quality.parse_train_settings(args.train_set))
    quality.train_config(cfg, "", Path(cfg.out), "run")  # a bad setting fails here, before any model loads
    classifier = load_classifier(args.classifier or assets.classifier_file())
    clip, clip_name = _quality_clip(args.clip)
    target = _quality_target(args)
    report = quality.run_quality(target, classifier, cfg, progress=say, clip=clip, clip_name=clip_name)
    print(quality.format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _quality_clip(name: str | None):
    if name is None:
        return None, ""
    from ..micro.clip_pretrain import clip_folder
    from ..scoring.clip import load_clip

    folder = str(clip_folder()) if name == "micro" else name
    return load_clip(folder), folder


def _quality_target(args: argparse.Namespace):
    from ..micro import assets

    if args.engine.startswith("webui"):
        if args.model:
            raise TIError("--model is for --engine standalone; the webui trains on the checkpoint it has loaded")
        if args.engine == "webui-builtin":
            if args.train_set:
                raise TIError("--train-set sets this trainer's settings; --engine webui-builtin runs the webui's own "
                              "trainer at its defaults: leave --train-set out")
            from ..micro.webui_builtin import WebuiBuiltinTarget

            return WebuiBuiltinTarget(args.webui_url, args.webui_auth, progress=say)
        from ..micro.webui_target import WebuiTarget

        return WebuiTarget(args.webui_url, args.webui_auth, progress=say)
    from ..micro.quality import StandaloneTarget, load_micro_engine
    from .progress import ConsoleProgress

    model = args.model or str(assets.model_folder())
    return StandaloneTarget(load_micro_engine(model, args.threads), model, on_event=ConsoleProgress())
