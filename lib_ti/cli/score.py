"""``python -m lib_ti score --run DIR``: score every checkpoint of a run with CLIP and recommend one.

The scoring itself is ``lib_ti.scoring.score.score_run`` (the webui tab can call it too); here are
the flags, loading the model the run trained on and the CLIP model, and the console table.
"""

from __future__ import annotations

import argparse

from ..errors import say


def add_parser(sub) -> None:
    from ..scoring.defaults import DEFAULT_CLIP, EDIT_PROMPTS

    score = sub.add_parser(
        "score", help="score a run's checkpoints (CLIP fidelity to the training images, editability of new prompts) "
        "and recommend one", description="Render the run's checkpoints with its preview settings and score them "
        "with a local CLIP model: fidelity (image-image similarity to the training images) and editability "
        "(image-text similarity to prompts in new contexts). Writes scores.json and grid.png to <run>/scores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    score.add_argument("--run", dest="run_dir", required=True,
                       help="the run folder (it holds config.yaml and checkpoints/)")
    score.add_argument("--clip", default=DEFAULT_CLIP, help="a local CLIP model folder, or a model id in the local "
                       "Hugging Face cache (nothing is downloaded)")
    score.add_argument("--prompt", action="append", default=[], metavar="PROMPT",
                       help=f"an editability prompt with [name] (repeatable; default: {' | '.join(EDIT_PROMPTS)})")
    score.add_argument("--seeds", type=int, default=2, help="renders per prompt")
    score.add_argument("--model", help="the model to render with (default: the run's own model)")
    score.add_argument("--data", dest="data_dir", help="the training images, if they moved (default: the run's)")
    score.add_argument("--out", help="folder for scores.json and grid.png (default: <run>/scores)")
    score.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda when available)")
    score.add_argument("--weights-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    score.add_argument("--model-config", help="single-file checkpoints: a local diffusers folder with the configs")
    score.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Heavy: torch and the model libraries.
    from ..devices import choose_device
    from ..engines.standalone import load_engine
    from ..scoring.clip import load_clip
    from ..scoring.defaults import EDIT_PROMPTS
    from ..scoring.score import ScoreOptions, format_report, list_checkpoints, run_config, score_run

    opts = ScoreOptions(args.run_dir, clip=args.clip, prompts=tuple(args.prompt) or EDIT_PROMPTS, seeds=args.seeds,
                        data_dir=args.data_dir or "", out=args.out or "")
    cfg = run_config(opts.run_dir)  # a wrong folder fails here, before any model loads
    list_checkpoints(opts.run_dir, cfg.name)
    device = choose_device(args.device)
    clip = load_clip(opts.clip, device=device)
    engine = load_engine(args.model or cfg.model, device, args.weights_dtype, args.model_config)
    report = score_run(engine, clip, opts, progress=say)
    print(format_report(report))
    return 0
