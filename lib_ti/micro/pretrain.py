"""Pretrain the micro Stable Diffusion on the shapes world: ``python -m lib_ti.micro.pretrain``.

Stages, each seeded from ``--seed`` so the same command gives the same weights (with the same
torch version and thread count):

1. the VAE, on random 32x32 crops of fresh generator images (it is convolutional: crops teach the
   same edges and colours at a quarter of the cost, and the full-resolution layers are what cost);
2. the latents of a fixed set of images, encoded once (mean and std kept, so every step still
   draws a fresh latent, as the TI trainer does);
3. the text encoder and UNet together, on those latents with captions drawn fresh every step;
   the weights kept are an exponential moving average, which samples far better than the last step;
4. the classifier that scores renders (on fresh generator images, half of them passed through the VAE);
5. the saved model (fp16), loaded back through the standalone engine and asked for renders, which
   the classifier scores: the prompt-following figures in ``pretrain-report.json``.

The shipped weights in ``lib_ti/assets/micro-sd`` come from the defaults:
``python -m lib_ti.micro.pretrain --out lib_ti/assets/micro-sd``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import add_noise, min_snr_weights
from ..engines.standalone import StandaloneEngine, TextEncoder
from ..errors import PREFIX, TIError, exit_with
from ..grid import image_grid, save_png
from ..models.tiny import sd_scheduler
from . import model as micro
from .classifier import (
    ClassifierConfig,
    accuracy_on_fresh_images,
    accuracy_on_round_trips,
    classify,
    save_classifier,
    to_pixels,
    train_classifier,
    vae_round_trips,
)
from .evaluate import plain_cases, prompt_following, render, score
from .optim import warmup_cosine
from .shapes import CaptionMix, draw, random_scene, training_caption

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_FOLDER = "extensions/sd-webui-ti-trainer"  # where the webui clones this repository


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    threads: int = 1  # on a shared 2-core machine one thread does more work per CPU second than two
    # VAE
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4  # light: SD's VAE also keeps detail over a tidy latent distribution
    # latents
    dataset_size: int = 8000
    # text encoder + UNet
    steps: int = 3600
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    noise_offset: float = 0.1  # lets the model move a whole image's mean: flat backgrounds come out saturated
    min_snr_gamma: float = 5.0  # Hang et al. 2023: faster convergence than the plain loss
    preview_every: int = 500  # renders + classifier scores along the way: previews/ in the output folder
    captions: CaptionMix = field(default_factory=CaptionMix)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # evaluation of the saved model
    eval_renders: int = 64
    eval_steps: int = 20
    eval_cfg_scale: float = 7.0

    def scaled(self, fraction: float) -> PretrainConfig:
        """The same recipe with every stage's length times ``fraction`` (smoke runs and tests)."""
        def n(value: int, low: int = 2) -> int:
            return max(low, round(value * fraction))

        return dataclasses.replace(
            self, vae_steps=n(self.vae_steps), dataset_size=n(self.dataset_size, self.batch_size), steps=n(self.steps),
            warmup_steps=n(self.warmup_steps, 1), eval_renders=n(self.eval_renders, 8),
            preview_every=n(self.preview_every, 1),
            classifier=dataclasses.replace(self.classifier, steps=n(self.classifier.steps),
                                           round_trip_pool=n(self.classifier.round_trip_pool, 8)))


# ---------------------------------------------------------------------- stage 1: VAE
def vae_batch(rng: random.Random, cfg: PretrainConfig) -> torch.Tensor:
    pixels = to_pixels([draw(random_scene(rng)) for _ in range(cfg.vae_batch)])
    if cfg.vae_crop >= pixels.shape[-1]:
        return pixels
    # crops on the latent grid (multiples of 8), so every crop downsamples like a whole image
    top, left = (rng.randrange(0, pixels.shape[-1] - cfg.vae_crop + 1, 8) for _ in range(2))
    return pixels[..., top:top + cfg.vae_crop, left:left + cfg.vae_crop]


def train_vae(cfg: PretrainConfig, log) -> Any:  # a diffusers AutoencoderKL
    torch.manual_seed(cfg.seed + 1)
    vae = micro.vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, cfg.vae_steps // 20, cfg.vae_steps)
    rng = random.Random(f"vae-{cfg.seed}")
    for step in range(cfg.vae_steps):
        pixels = vae_batch(rng, cfg)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        error = recon - pixels
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = error.abs().mean() + error.square().mean() + cfg.vae_kl_weight * kl
        _step(optimizer, schedule, loss)
        log(step, {"loss": loss.item()})
    return vae.eval()


@torch.no_grad()
def vae_quality(vae, seed: int, n: int = 64) -> dict:
    """Reconstruction error on fresh images, and the latent scale the diffusion model will need."""
    rng = random.Random(f"vae-test-{seed}")
    pixels = to_pixels([draw(random_scene(rng)) for _ in range(n)])
    latents = vae.encode(pixels).latent_dist.mean
    recon = vae.decode(latents).sample.clamp(-1, 1)
    return {"reconstruction_mse": float((recon - pixels).square().mean()),
            "latent_std": float(latents.std()), "scaling_factor": float(1 / latents.std())}


# ---------------------------------------------------------------------- stage 2: latents
@torch.no_grad()
def encode_dataset(vae, cfg: PretrainConfig, scaling: float, log) -> tuple[list, torch.Tensor, torch.Tensor]:
    rng = random.Random(f"dataset-{cfg.seed}")
    scenes = [random_scene(rng) for _ in range(cfg.dataset_size)]
    means, stds = [], []
    for start in range(0, len(scenes), 64):
        dist = vae.encode(to_pixels([draw(s) for s in scenes[start:start + 64]])).latent_dist
        means.append(dist.mean * scaling)
        stds.append(dist.std * scaling)
        log(start // 64, {})
    return scenes, torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------- stage 3: text encoder + UNet
class EMA:
    """An exponential moving average of parameters, with the usual warm-up (short runs still average)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=True):
            param.copy_(shadow)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the training weights come back after."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.params, strict=True):
                    param.copy_(saved)


def train_denoiser(cfg: PretrainConfig, scenes: list, mean: torch.Tensor, std: torch.Tensor, log,
                   preview: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None):
    """Train the UNet and text encoder together; ``preview(step, unet, text)`` sees the averaged weights
    every ``preview_every`` steps."""
    torch.manual_seed(cfg.seed + 2)
    unet, text = micro.unet(), micro.text_encoder()
    tokenize = _Tokenizer(micro.tokenizer())
    alphas = _alphas_cumprod(sd_scheduler("epsilon"))
    optimizer = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=cfg.learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    ema = EMA([unet, text], cfg.ema_decay)
    rng = random.Random(f"captions-{cfg.seed}")
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    unet.train()
    text.train()
    for step in range(cfg.steps):
        index = torch.randint(0, len(scenes), (cfg.batch_size,), generator=generator)
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        ids = tokenize([training_caption(scenes[i], rng, cfg.captions) for i in index.tolist()])
        noise = torch.randn(latents.shape, generator=generator)
        noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
        timesteps = torch.randint(0, len(alphas), (cfg.batch_size,), generator=generator)
        pred = unet(add_noise(alphas, latents, noise, timesteps), timesteps,
                    encoder_hidden_states=text(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss * min_snr_weights("epsilon", alphas, timesteps, cfg.min_snr_gamma)).mean()
        _step(optimizer, schedule, loss)
        ema.update()
        log(step, {"loss": loss.item()})
        if preview is not None and cfg.preview_every and (step + 1) % cfg.preview_every == 0:
            with ema.applied():
                unet.eval(), text.eval()
                preview(step + 1, unet, text)
                unet.train(), text.train()
    ema.copy_to_model()
    return unet.eval(), text.eval()


class _Tokenizer:
    """Caption -> the 77 ids the engine will feed at render time (BOS, words, EOS, EOS padding); cached."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for text in set(captions) - set(self.cache):
            self.cache[text] = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                              truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[text] for text in captions])


def _alphas_cumprod(scheduler) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config).alphas_cumprod.float()


def _step(optimizer, schedule, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


# ---------------------------------------------------------------------- the whole run
def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, clip_root: str | None = None) -> dict:
    """Run every stage and write the model, classifier and report into ``out_dir`` (replaced as a whole,
    only once everything succeeded). Returns the report."""
    out = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    report: dict = {"config": dataclasses.asdict(cfg), "environment": _environment(cfg), "stages": {}}
    try:
        with _Stage(report, "vae", cfg.vae_steps) as stage:
            vae = train_vae(cfg, stage.log)
            report["vae"] = vae_quality(vae, cfg.seed)
        scaling = report["vae"]["scaling_factor"]
        vae.register_to_config(scaling_factor=scaling)
        with _Stage(report, "latents", -(-cfg.dataset_size // 64)) as stage:
            scenes, mean, std = encode_dataset(vae, cfg, scaling, stage.log)
        with _Stage(report, "classifier", cfg.classifier.steps) as stage:
            pool = cfg.classifier.round_trip_pool
            round_trips = vae_round_trips(vae, scenes[:pool], mean[:pool], scaling)
            classifier = train_classifier(cfg.classifier, progress=lambda loss: stage.log(None, {"loss": loss}),
                                          round_trips=round_trips)
        report["classifier"] = {"fresh_images": accuracy_on_fresh_images(classifier, 1000, cfg.seed),
                                "through_the_vae": accuracy_on_round_trips(classifier, vae, 512, cfg.seed)}
        previews = _Previews(vae, classifier, staging / "previews", report)
        with _Stage(report, "unet_and_text_encoder", cfg.steps) as stage:
            unet, text = train_denoiser(cfg, scenes, mean, std, stage.log, previews)
        staging.mkdir(parents=True, exist_ok=True)
        micro.save_model(micro.pipeline(unet, vae, text), staging, clip_root=clip_root or default_clip_root(out))
        save_classifier(classifier, staging / "classifier.safetensors")
        with _Stage(report, "evaluation", cfg.eval_renders) as stage:
            report["prompt_following"] = _evaluate(staging, classifier, cfg, stage.log)
        report["files_mb"] = _sizes(staging)
        (staging / "pretrain-report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


class _Previews:
    """Renders of a few plain prompts while the UNet trains, scored: is it learning, and how fast?"""

    def __init__(self, vae, classifier, folder: Path, report: dict, n: int = 16) -> None:
        self.vae, self.classifier, self.folder, self.n = vae, classifier, folder, n
        self.scores = report.setdefault("previews", {})
        self.tokenizer = micro.tokenizer()  # built once: it writes the vocabulary files to a temp folder

    def __call__(self, step: int, unet, text) -> None:
        engine = StandaloneEngine(unet, self.vae, [TextEncoder("clip_l", text, self.tokenizer)],
                                  dict(sd_scheduler("epsilon").config), family="sd1", device=torch.device("cpu"),
                                  checkpoint_name=micro.NAME)
        cases = plain_cases(self.n, seed=0)
        images = render(engine, cases)
        self.scores[step] = score(classify(self.classifier, images), cases)
        label = "\n".join(f"{k} {v:.2f}" for k, v in self.scores[step].items())
        # at native size: these ship with the model, and every kilobyte counts against its budget
        save_png(image_grid([images[:8], images[8:16]], [f"step {step}\n{label}", ""], cell=64),
                 self.folder / f"{step}.png")


def _evaluate(folder: Path, classifier, cfg: PretrainConfig, log) -> dict:
    engine = StandaloneEngine.load(folder / f"{micro.NAME}.diffusers")
    return prompt_following(engine, classifier, n=cfg.eval_renders, seed=cfg.seed, steps=cfg.eval_steps,
                            cfg_scale=cfg.eval_cfg_scale, on_render=lambda i: log(i, {}))


def default_clip_root(out: Path) -> str:
    """Where the yaml says the model folder is: inside this repository, the path the webui (run from its
    own folder) sees once the extension is installed; anywhere else, the absolute path."""
    try:
        return f"{EXTENSION_FOLDER}/{out.resolve().relative_to(REPO_ROOT).as_posix()}"
    except ValueError:
        return str(out.resolve())


def _replace_folder(new: Path, target: Path) -> None:
    """Swap ``new`` in for ``target``: a failure midway leaves the old folder (renamed aside) intact."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _sizes(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"total": round(sum(files.values()) / 1e6, 2),
            "largest": {k: round(v / 1e6, 2) for k, v in sorted(files.items(), key=lambda kv: -kv[1])[:8]}}


def _environment(cfg: PretrainConfig) -> dict:
    import platform

    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "threads": cfg.threads, "cpus": os.cpu_count()}


class _Stage:
    """A progress bar for one stage, and its wall and CPU seconds in the report."""

    def __init__(self, report: dict, name: str, total: int) -> None:
        self.report, self.name, self.total = report, name, total

    def __enter__(self) -> _Stage:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.name, unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=2.0)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def log(self, _step, values: dict) -> None:
        self.bar.update(1)
        if values:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.report["stages"][self.name] = {"wall_s": round(time.perf_counter() - self.wall, 1),
                                            "cpu_s": round(time.process_time() - self.cpu, 1)}


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_ti.micro.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="outputs/micro-sd",
                        help="folder to write (replaced when done); lib_ti/assets/micro-sd refreshes the shipped model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=PretrainConfig.threads, help="torch CPU threads")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's length (0.05 = a smoke run of a few minutes)")
    parser.add_argument("--clip-root", help="the output folder as the webui's yaml should name it (default: "
                        f"{EXTENSION_FOLDER}/<path in the repository>, or the absolute path outside it)")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.threads < 1:
        raise TIError(f"--scale must be > 0 and --threads >= 1, got {args.scale} and {args.threads}")
    cfg = PretrainConfig(seed=args.seed, threads=args.threads)
    cfg = cfg.scaled(args.scale) if args.scale != 1.0 else cfg
    t0 = time.perf_counter()
    report = pretrain(cfg, args.out, clip_root=args.clip_root)
    print(f"{PREFIX} micro model written to {args.out} in {time.perf_counter() - t0:.0f}s")
    print(json.dumps({k: report[k] for k in ("stages", "vae", "classifier", "prompt_following", "files_mb")}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    exit_with(main)
