"""``python -m lib_ti demo``: the whole pipeline on a built-in default, offline, on CPU, in under a minute.

It builds a tiny random-weight SD1 model, draws a small image set, trains an embedding with a progress
bar, and reads the result back with ``inspect``. Random weights learn nothing worth looking at; this
shows the tool working end to end, not embedding quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import PREFIX


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train a demo embedding on a built-in tiny model (offline, CPU, < 1 min)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="outputs/demo", help="folder for the model, images and the run")
    demo.add_argument("--steps", type=int, default=100, help="training steps")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .bench import draw_images
    from .cli import train_with_progress
    from .config import TrainConfig
    from .data import prepare_data
    from .engines.standalone import StandaloneEngine
    from .inspect_cmd import describe, format_description
    from .tiny import build_tiny_model

    out = Path(args.out)
    model = out / "tiny-sd1"
    if not (model / "model_index.json").is_file():
        print(f"{PREFIX} building a tiny random-weight SD1 model in {model}")
        build_tiny_model("sd1", model)
    images = draw_images(out / "images", 8, 64)
    cfg = TrainConfig(name="demo-token", init_text="shape", num_vectors=2, model=str(model), data_dir=str(images),
                      output_dir=str(out / "run"), overwrite=True, steps=args.steps, batch_size=2, width=64,
                      height=64, save_every=max(1, args.steps // 2), preview_every=args.steps, preview_steps=4,
                      learning_rate="0.02")
    engine = StandaloneEngine.load(model, device=torch.device("cpu"))
    code = train_with_progress(engine, cfg, prepare_data(cfg), resume=False)
    final = cfg.run_dir / f"{cfg.name}.safetensors"
    print(format_description(describe(final)))
    print(f"{PREFIX} demo done: embedding {final}, loss log {cfg.run_dir / 'loss.csv'}, previews {cfg.run_dir / 'previews'}")
    return code
