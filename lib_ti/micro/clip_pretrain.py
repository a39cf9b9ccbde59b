"""A CLIP of the shapes world, to check checkpoint scoring: ``python -m lib_ti.micro.clip_pretrain``.

``python -m lib_ti score`` needs a CLIP, and none can be downloaded on the project's machines; a
random one gives scores that differ only in the third decimal. This trains a tiny
``transformers.CLIPModel`` (a 4-layer ViT over 16x16 patches of the 64x64 images, a 3-layer text encoder)
contrastively on freshly drawn scenes and captions that name the shape, its colour and the
background in the world's phrasings, so ``score --clip lib_ti/assets/micro-clip`` measures
something the classifier can confirm.

* Loss: CLIP's symmetric InfoNCE with a learned temperature, except that a caption counts as a
  positive for every image of the batch it describes truly ("a red star" for every red star of
  any background): the world has only 448 scenes' worth of words, so a batch of 64 holds many
  true pairs that plain InfoNCE would push apart.
* Images go through ``lib_ti.scoring.clip.prepare_image``, the preprocessing scoring uses; half of
  each batch is roughened (blur, colour shift, noise) and a share comes through the micro model's
  VAE, since what it will score are renders, which are soft.
* Tokenizer: the micro model's (the real CLIP BPE), cut down to the tokens of the world's words
  (``world_tokenizer``): those words tokenize to the same pieces, any other word becomes the
  unknown token, and the token table shrinks from 49408 rows to a few hundred.

The shipped ``lib_ti/assets/micro-clip`` comes from the defaults (about 10 minutes on one CPU thread):
``python -m lib_ti.micro.clip_pretrain --out lib_ti/assets/micro-clip``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PREFIX, TIError, exit_with
from ..formats.clip_tokenizer import BOS, EOS, bytes_to_unicode, merges_and_vocab
from ..scoring.clip import features, pixel_batch
from ..scoring.defaults import EDIT_PROMPTS
from ..templates import BUILTIN_TEMPLATES, NAME
from .classifier import classify, roughen, to_image, to_pixels
from .optim import warmup_cosine
from .shapes import COLOUR_NAMES, GENERIC_SHAPE, IMAGE_SIZE, SHAPES, Scene, draw, phrase, random_scene

ASSET = Path(__file__).resolve().parents[1] / "assets" / "micro-clip"
REBUILD = "python -m lib_ti.micro.clip_pretrain --out lib_ti/assets/micro-clip"
MAX_TOKENS = 32  # the longest world caption ("a cropped photo of the star in white on a black background") is 14
# Zero-shot prompts: each class's text, the image gets the nearest one.
ZERO_SHOT = {
    "shape": ("a photo of a {}", SHAPES),
    "colour": ("a photo of a {} shape", COLOUR_NAMES),
    "background": ("a photo of a shape on a {} background", COLOUR_NAMES),
}


@dataclass(frozen=True)
class ClipConfig:
    seed: int = 0
    threads: int = 1
    steps: int = 3600
    batch_size: int = 64  # 128 doubles the step's cost; the multi-positive loss needs no huge batch
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    width: int = 64  # both towers and the shared embedding
    text_layers: int = 3
    vision_layers: int = 4
    heads: int = 4
    # 16 patches of 16x16 pixels. With 8x8 patches a step costs 3x as much and the shape is learnt no faster: a
    # ViT this small, trained supervised on shape alone, stays near chance for 200 steps either way (measured)
    patch: int = 16
    rough_share: float = 0.5  # of each batch: blurred, colour-shifted, noisy
    max_blur: float = 2.5  # Gaussian sigma in pixels, as the classifier's training
    round_trip_pool: int = 256  # images through the micro VAE (0: none), drawn into batches like the classifier's
    round_trip_share: float = 0.25
    shape_group: int = 4  # fresh scenes come in runs this long of one colour and background, every shape different
    # captions: how often a word is left out or replaced by the neutral word
    generic_shape: float = 0.2
    no_colour: float = 0.25
    no_background: float = 0.35
    template_prefix: float = 0.4
    eval_images: int = 1000
    render_eval: int = 64  # renders of the micro model to name zero-shot (0: none)

    def scaled(self, fraction: float) -> ClipConfig:
        """The same recipe, ``fraction`` as long (smoke runs and tests)."""
        pool = min(self.round_trip_pool, round(self.round_trip_pool * fraction))
        return dataclasses.replace(self, steps=max(2, round(self.steps * fraction)), round_trip_pool=pool,
                                   eval_images=max(16, round(self.eval_images * fraction)),
                                   render_eval=min(self.render_eval, max(8, round(self.render_eval * fraction))))


# ---------------------------------------------------------------------- the world's tokenizer
def world_words() -> list[str]:
    """Every text the world's captions, templates and default scoring prompts use."""
    texts = [*SHAPES, *COLOUR_NAMES, GENERIC_SHAPE, "a photo of a shape in red on a blue background"]
    texts += [line.replace(NAME, "") for line in (*BUILTIN_TEMPLATES["object"], *EDIT_PROMPTS)]
    return sorted({w for text in texts for w in _words(text)})


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], set[tuple[str, str]]]:
    """CLIP's BPE of one word: its pieces, and the merges that made them."""
    byte_map = bytes_to_unicode()
    chars = [byte_map[b] for b in word.encode("utf-8")]
    pieces = [*chars[:-1], chars[-1] + "</w>"]
    used = set()
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:], strict=False), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        used.add(pair)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces, used


def world_tokenizer(out_dir: str | Path, words: Sequence[str] = ()) -> Path:
    """Write the micro model's CLIP tokenizer cut down to ``words`` (default ``world_words()``): the 512 byte
    tokens, the merges those words use (in the real order, so they split exactly as the full tokenizer splits
    them), the tokens those merges make, BOS and EOS (also the unknown and padding token)."""
    merges, _ = merges_and_vocab()
    ranks = {(a, b): i for i, (a, b) in enumerate(m.split() for m in merges)}
    used: set[tuple[str, str]] = set()
    for word in words or world_words():
        used |= _bpe(word, ranks)[1]
    kept = sorted(used, key=ranks.__getitem__)
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(b + "</w>" for b in base), *("".join(m) for m in kept), BOS, EOS]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in kept) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {**special, "add_prefix_space": False, "errors": "replace", "do_lower_case": True,
              "model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---------------------------------------------------------------------- model
def clip_model(cfg: ClipConfig, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": cfg.width, "intermediate_size": 4 * cfg.width, "num_attention_heads": cfg.heads,
             "hidden_act": "quick_gelu"}
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = CLIPConfig(
        text_config={**tower, "num_hidden_layers": cfg.text_layers, "vocab_size": len(tokenizer),
                     "max_position_embeddings": MAX_TOKENS,
                     "bos_token_id": tokenizer.convert_tokens_to_ids(BOS), "eos_token_id": eos, "pad_token_id": eos},
        vision_config={**tower, "num_hidden_layers": cfg.vision_layers, "image_size": IMAGE_SIZE,
                       "patch_size": cfg.patch},
        projection_dim=cfg.width,
    )
    return CLIPModel(config)


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class Said:
    """What a caption states; None: it does not say."""

    shape: str | None
    colour: str | None
    background: str | None

    def fits(self, scene: Scene) -> bool:
        return all(v is None or v == getattr(scene, k) for k, v in dataclasses.asdict(self).items())


def _prefixes() -> tuple[str, ...]:
    return tuple(line.replace(f" {NAME}", "") for line in BUILTIN_TEMPLATES["object"])


def clip_caption(scene: Scene, rng: random.Random, cfg: ClipConfig) -> tuple[str, Said]:
    """One way to describe ``scene`` ("a photo of a star in red on a blue background", "a red shape"), and what
    it states."""
    shape = None if rng.random() < cfg.generic_shape else scene.shape
    colour = None if rng.random() < cfg.no_colour else scene.colour
    background = None if rng.random() < cfg.no_background else scene.background
    body = phrase(shape or GENERIC_SHAPE, colour, background, alternative=rng.random() < 0.5)
    article = rng.choice(_prefixes()) if rng.random() < cfg.template_prefix else "a"
    return f"{article} {body}", Said(shape, colour, background)


def positives(scenes: Sequence[Scene], said: Sequence[Said]) -> torch.Tensor:
    """[images, texts]: 1 where the text is true of the image (its own caption always is)."""
    return torch.tensor([[float(s.fits(scene)) for s in said] for scene in scenes])


def _round_trip_pool(cfg: ClipConfig) -> tuple[list[Scene], list] | None:
    """Fresh scenes through the shipped micro model's VAE (encode, decode): how renders look."""
    if not cfg.round_trip_pool:
        return None
    from diffusers import AutoencoderKL

    from .assets import model_folder

    vae = AutoencoderKL.from_pretrained(model_folder() / "vae").float().eval()
    rng = random.Random(f"clip-round-trips-{cfg.seed}")
    scenes = [random_scene(rng) for _ in range(cfg.round_trip_pool)]
    images = []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            pixels = to_pixels([draw(s) for s in scenes[i:i + 64]])
            decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
            images += [to_image(p) for p in decoded]
    return scenes, images


def grouped_scenes(rng: random.Random, n: int, group: int) -> list[Scene]:
    """``n`` fresh scenes in runs of ``group`` that share colour and background and differ in shape: colour and
    background are far easier to see than shape, and with random batches they alone separate nearly every pair, so
    the shape is never learnt (zero-shot shape accuracy 0.25 after 1800 steps, measured)."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        colour, background = rng.sample(COLOUR_NAMES, 2)
        shapes = rng.sample(SHAPES, min(group, len(SHAPES)))
        scenes += [random_scene(rng, shape=s, colour=colour, background=background) for s in shapes]
    return scenes[:n]


def batch(rng: random.Random, generator: torch.Generator, cfg: ClipConfig,
          pool: tuple[list[Scene], list] | None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Pixels, captions and the positives matrix of one batch: fresh scenes (some roughened) and VAE round trips."""
    n_pool = round(cfg.batch_size * cfg.round_trip_share) if pool else 0
    scenes = grouped_scenes(rng, cfg.batch_size - n_pool, cfg.shape_group)
    images = [draw(s) for s in scenes]
    n_rough = round(len(images) * cfg.rough_share)
    if n_rough:
        rough = roughen(to_pixels(images[:n_rough]), generator, cfg.max_blur)
        images[:n_rough] = [to_image(p) for p in rough]
    if pool:
        picks = [rng.randrange(len(pool[0])) for _ in range(n_pool)]
        scenes += [pool[0][i] for i in picks]
        images += [pool[1][i] for i in picks]
    captions, said = zip(*(clip_caption(s, rng, cfg) for s in scenes), strict=True)
    return pixel_batch(images, IMAGE_SIZE), list(captions), positives(scenes, said)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch, each side's target spread evenly over its true pairs."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    to_text = -(F.log_softmax(logits, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    to_image_ = -(F.log_softmax(logits, dim=0) * pos / pos.sum(0, keepdim=True)).sum(0).mean()
    return (to_text + to_image_) / 2


# ---------------------------------------------------------------------- training and evaluation
def train_clip(cfg: ClipConfig, tokenizer, log=lambda _step, _loss: None):
    """Train from ``cfg.seed`` (deterministic for a torch version and thread count); returns the model in eval mode."""
    torch.manual_seed(cfg.seed)
    model = clip_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=cfg.learning_rate)
    schedule = warmup_cosine(optimizer, cfg.steps // 20, cfg.steps)
    rng = random.Random(f"clip-{cfg.seed}")
    generator = torch.Generator().manual_seed(cfg.seed)
    pool = _round_trip_pool(cfg)
    ids: dict[str, list[int]] = {}
    model.train()
    for step in range(cfg.steps):
        pixels, captions, pos = batch(rng, generator, cfg, pool)
        for c in set(captions) - set(ids):
            ids[c] = tokenizer(c, truncation=True).input_ids
        tokens = tokenizer.pad({"input_ids": [ids[c] for c in captions]}, return_tensors="pt")
        image = features(model.get_image_features(pixel_values=pixels))
        text = features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        loss = contrastive_loss(image, text, model.logit_scale.exp(), pos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of 1/100
        log(step, loss.item())
    return model.eval()


def zero_shot(clip, images: Sequence, scenes: Sequence[Scene]) -> dict[str, float]:
    """Accuracy per attribute of naming each image by its nearest ``ZERO_SHOT`` prompt. ``clip``: a
    ``lib_ti.scoring.clip.Clip``."""
    feats = clip.image_features(list(images))
    out = {}
    for attribute, (template, classes) in ZERO_SHOT.items():
        picks = (feats @ clip.text_features([template.format(c) for c in classes]).T).argmax(1).tolist()
        out[attribute] = round(sum(classes[p] == getattr(s, attribute) for p, s in zip(picks, scenes, strict=True))
                               / len(scenes), 4)
    return out


def held_out(n: int, seed: int) -> tuple[list[Scene], list]:
    """``n`` clean scenes from a seed stream training never draws from."""
    rng = random.Random(f"clip-test-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, [draw(s) for s in scenes]


def evaluate(clip, cfg: ClipConfig) -> dict:
    """Zero-shot accuracy on held-out clean scenes and on held-out scenes roughened like a soft render."""
    scenes, images = held_out(cfg.eval_images, cfg.seed)
    generator = torch.Generator().manual_seed(10_000 + cfg.seed)
    rough = [to_image(p) for p in roughen(to_pixels(images), generator, cfg.max_blur)]
    return {"clean": zero_shot(clip, images, scenes), "roughened": zero_shot(clip, rough, scenes),
            "images": len(scenes), "prompts": {k: v[0] for k, v in ZERO_SHOT.items()}}


def on_renders(clip, n: int, seed: int) -> dict:
    """Zero-shot accuracy on the shipped micro model's renders of plain prompts ("a red star on a blue background"),
    against what the prompt asked for and against what the classifier sees: the CLIP will score renders."""
    from .assets import classifier_file, model_folder
    from .classifier import load_classifier
    from .evaluate import plain_cases, render
    from .quality import load_micro_engine

    cases = plain_cases(n, seed)
    images = render(load_micro_engine(str(model_folder())), cases)
    seen = classify(load_classifier(classifier_file()), images)
    asked = [Scene(c.shape, c.colour, c.background, 0, 0, 0) for c in cases]
    judged = [Scene(p.shape, p.colour, p.background, 0, 0, 0) for p in seen]
    return {"renders": n, "vs_prompt": zero_shot(clip, images, asked), "vs_classifier": zero_shot(clip, images, judged)}


def build(cfg: ClipConfig, out_dir: str | Path, *, command: str = "") -> dict:
    """Train, save (fp16 safetensors, config.json, tokenizer files) into ``out_dir`` (replaced only once all went
    well), load it back through the scoring's ``load_clip`` and evaluate it; writes ``report.json``."""
    from ..scoring.clip import load_clip

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = load_tokenizer(world_tokenizer(staging))
        wall, cpu = time.perf_counter(), time.process_time()
        losses: list[float] = []
        model = train_clip(cfg, tokenizer, _progress(cfg.steps, losses))
        train_s = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        model.to(torch.float16).save_pretrained(staging, safe_serialization=True)
        report: dict = {"command": command, "config": dataclasses.asdict(cfg), "training": train_s,
                        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
                        "temperature": round(float(model.logit_scale.detach().exp()), 2),
                        "zero_shot": evaluate(load_clip(str(staging)), cfg), "environment": _environment(cfg)}
        if cfg.render_eval:
            report["zero_shot"]["micro_sd_renders"] = on_renders(load_clip(str(staging)), cfg.render_eval, cfg.seed)
        report["files_mb"] = round(sum(p.stat().st_size for p in staging.iterdir()) / 1e6, 2)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _progress(total: int, losses: list[float]):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="micro clip", unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=2.0)

    def log(step: int, loss: float) -> None:
        losses.append(loss)
        bar.update(1)
        bar.set_postfix({"loss": f"{loss:.3f}"}, refresh=False)
        if step + 1 == total:
            bar.close()

    return log


def _environment(cfg: ClipConfig) -> dict:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": cfg.threads, "cpus": os.cpu_count()}


def clip_folder(path: str | Path = ASSET) -> Path:
    """The shipped micro CLIP's folder, or a TIError saying how to rebuild it."""
    folder = Path(path)
    weights = folder / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size < 1024:
        raise TIError(f"the micro CLIP {str(folder)!r} is missing or a stub (a Git LFS pointer?); rebuild it with "
                      f"`{REBUILD}`")
    return folder


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_ti.micro.clip_pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="outputs/micro-clip",
                        help="folder to write (replaced when done); lib_ti/assets/micro-clip refreshes the shipped one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=ClipConfig.steps)
    parser.add_argument("--threads", type=int, default=ClipConfig.threads, help="torch CPU threads")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the training length (0.02: a smoke run)")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.threads < 1 or args.steps < 1:
        raise TIError(f"--scale must be > 0, --threads and --steps >= 1; got {args.scale}, {args.threads}, "
                      f"{args.steps}")
    cfg = ClipConfig(seed=args.seed, threads=args.threads, steps=args.steps)
    cfg = cfg.scaled(args.scale) if args.scale != 1.0 else cfg
    command = "python -m lib_ti.micro.clip_pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    report = build(cfg, args.out, command=command.strip())
    print(f"{PREFIX} micro CLIP written to {args.out} in {report['training']['wall_s']:.0f}s of training")
    print(json.dumps({k: report[k] for k in ("training", "final_loss", "temperature", "zero_shot", "files_mb")},
                     indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    exit_with(main)
