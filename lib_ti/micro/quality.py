"""``python -m lib_ti bench quality``: does textual inversion learn the concept? A number, on a CPU.

On the micro model (``lib_ti/assets/micro-sd``), an embedding for one shape (the concept) is
trained from a handful of generator images of that shape in mixed colours, through the project's
trainer at its default settings. Every checkpoint then renders the same prompts that put the token
in new contexts ("a <token> in yellow on a black background"), and the classifier scores them:

* shape accuracy: the render shows the concept's shape;
* colour-follows-prompt: the shape has the colour the prompt asked for (the embedding must not
  overwrite the rest of the prompt); background-follows-prompt likewise;
* baseline: step 0, the init word's vectors; reference: the concept's own word ("triangle"), i.e.
  what the pretrained model does when told plainly: the ceiling an embedding can reach.

The default concept is the triangle: a shape the micro model draws when told plainly (so the
figure measures the embedding, not the model), and one the init word "shape" rarely gives. The
star and the cross are the model's weakest shapes: their thin arms are finer than the 8x8 latent,
so even "a red star" comes out a star only about half the time (README, figures per concept).

With ``clip`` (e.g. the shipped micro CLIP, ``lib_ti/assets/micro-clip``) the same renders also get
the Textual Inversion paper's CLIP scores, and the report says how well they rank the checkpoints
as the classifier does (Spearman, over the scored checkpoints):

* fidelity: mean CLIP image-image similarity of the renders to the training images, against shape
  accuracy (does the render show the concept?);
* editability: mean CLIP image-text similarity of each render to its prompt with the token replaced
  by the world's neutral word ("a yellow shape on a black background"), against colour-follows-
  prompt. The neutral word, not the concept's name: with the name the text would also reward the
  right shape, i.e. fidelity again; with the word simply left out ("a in yellow on ..."), as
  ``score`` does for open-world prompts, the text is one no caption of the world looks like.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from ..checkpoints import checkpoint_path, lora_checkpoint_path
from ..config import TrainConfig
from ..embedding import match_to_model
from ..engines.standalone import StandaloneEngine
from ..errors import TIError
from ..fileio import write_text
from ..formats.embeddings import load_embedding
from ..formats.lora import TEXT_PREFIXES, load_lora
from ..grid import image_grid, save_png
from ..lora import Adapters
from ..scoring.score import spearman
from ..trainer import train
from .classifier import classify
from .evaluate import Case, render, score
from .shapes import COLOUR_NAMES, GENERIC_SHAPE, SHAPES, draw, phrase, random_scene

TOKEN_TEMPLATES = (
    "a {token} in {colour} on a {background} background",
    "a {colour} {token} on a {background} background",
)
GRID_COLUMNS = 8
HOST_SETTINGS_SHOWN = ("learn_rate", "batch_size", "template_filename", "latent_sampling_method", "clip_grad_mode")
TARGET = 0.8  # the comparison of trainers: the first step with shape and colour both at least this


@dataclass(frozen=True)
class QualityConfig:
    concept: str = "triangle"
    init_text: str = "shape"  # the world's neutral word: "a shape" is any of the eight
    num_images: int = 5
    steps: int = 500
    eval_every: int = 100
    # The checkpoints scored, when not every eval_every'th (e.g. dense early, sparse late); each a multiple of
    # eval_every, which stays the save interval.
    eval_at: tuple[int, ...] = ()
    renders: int = 64  # prompts per checkpoint (each colour 8 times): at 32, one render moves a figure by 0.03
    sampler_steps: int = 20  # the trainer's default preview_steps
    cfg_scale: float = 7.0  # the trainer's default preview_cfg_scale
    seed: int = 0
    out: str = "outputs/bench-quality"
    # Trainer settings to compare against the defaults, e.g. (("template", "captions"),); the keys the
    # benchmark sets itself (``bench_settings``) cannot be changed here.
    train_settings: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.concept not in SHAPES:
            raise TIError(f"bench quality concept {self.concept!r} is not a shape of the micro world; use one of "
                          f"{', '.join(SHAPES)}")
        for name in ("num_images", "steps", "eval_every", "renders", "sampler_steps"):
            if getattr(self, name) < 1:
                raise TIError(f"bench quality {name}={getattr(self, name)} is invalid: use a whole number >= 1")
        odd = [s for s in self.eval_at if s < 1 or s > self.steps or s % self.eval_every]
        if odd:
            raise TIError(f"bench quality --eval-at {odd[0]} is invalid: each step must lie in 1..--steps "
                          f"({self.steps}) and be a multiple of --eval-every ({self.eval_every}), the save interval")
        fixed = bench_settings(self, "", Path(), "")
        for key, _ in self.train_settings:
            if key in fixed:
                raise TIError(f"bench quality --train-set {key}=... is set by the benchmark itself; use its own flags "
                              "(--steps, --eval-every, --seed, --init-text) or leave it")

    @property
    def token(self) -> str:
        return f"my-{self.concept}"

    @property
    def eval_steps(self) -> list[int]:
        if self.eval_at:
            return sorted(set(self.eval_at))
        return sorted({*range(self.eval_every, self.steps, self.eval_every), self.steps})


# ---------------------------------------------------------------------- the pieces
def write_concept_images(cfg: QualityConfig, folder: Path) -> Path:
    """``num_images`` pictures of the concept, each in a different colour, on random backgrounds, each
    with the caption that names everything but the concept ("a red [name] on a blue background"): the
    default template (auto) trains with it; ``--train-set template=object`` ignores it."""
    rng = random.Random(f"quality-images-{cfg.seed}")
    colours = list(COLOUR_NAMES)
    rng.shuffle(colours)
    for i in range(cfg.num_images):
        scene = random_scene(rng, shape=cfg.concept, colour=colours[i % len(colours)])
        image = save_png(draw(scene), folder / f"{cfg.concept}-{i:02d}.png")
        write_text(image.with_suffix(".txt"), f"a {scene.colour} [name] on a {scene.background} background\n")
    return folder


def token_cases(cfg: QualityConfig, word: str) -> list[Case]:
    """The evaluation prompts with ``word`` for the shape: every colour equally often, both phrasings."""
    rng = random.Random(f"quality-prompts-{cfg.seed}")
    cases = []
    for i in range(cfg.renders):
        colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
        background = rng.choice([c for c in COLOUR_NAMES if c != colour])
        template = TOKEN_TEMPLATES[(i // len(COLOUR_NAMES)) % len(TOKEN_TEMPLATES)]
        prompt = template.format(token=word, colour=colour, background=background)
        cases.append(Case(prompt, cfg.concept, colour, background, 10_000 + cfg.seed * 1000 + i))
    return cases


def bench_settings(cfg: QualityConfig, model: str, data_dir: Path, output_dir: str) -> dict[str, object]:
    """What the benchmark sets in the trainer's config: the run's name, paths and seed, the model's 64px
    size, and keeping every ``eval_every`` checkpoint (bookkeeping, not training)."""
    return {"name": cfg.token, "init_text": cfg.init_text, "model": model, "data_dir": str(data_dir),
            "output_dir": output_dir, "overwrite": True, "steps": cfg.steps, "width": 64, "height": 64,
            "save_every": cfg.eval_every, "keep_last": 0, "preview_every": 0, "seed": cfg.seed}


def train_config(cfg: QualityConfig, model: str, data_dir: Path, output_dir: str) -> TrainConfig:
    """The trainer's defaults, except ``bench_settings`` and the settings compared (``cfg.train_settings``)."""
    return TrainConfig.from_dict({**bench_settings(cfg, model, data_dir, output_dir), **dict(cfg.train_settings)})


@dataclass(frozen=True)
class Trained:
    steps_done: int
    embedding: str


class StandaloneTarget:
    """The loop runs here, on the standalone engine; renders take its preview path with the vectors spliced in."""

    name = "standalone"

    def token(self, cfg: QualityConfig) -> str:
        return cfg.token

    def __init__(self, engine, model: str, *, on_event: Callable[[object], None] | None = None) -> None:
        self.engine, self.model, self.on_event = engine, model, on_event  # on_event: e.g. a console progress bar
        self.tcfg: TrainConfig | None = None  # the run's config, once trained

    def train(self, cfg: QualityConfig, data_dir: Path) -> tuple[Trained, TrainConfig]:
        tcfg = self.tcfg = train_config(cfg, self.model, data_dir, str(Path(cfg.out) / "run"))
        result = train(self.engine, tcfg, on_event=self.on_event)
        return Trained(result.steps_done, str(result.final_path)), tcfg

    def render(self, cfg: QualityConfig, cases: list[Case], step: int | None) -> list:
        """``step`` 0: the init word's vectors; a step: that checkpoint; None: the cases name the shape plainly."""
        if step is None:
            vectors = self.engine.init_vectors("", 1)
        elif step == 0:
            vectors = self.engine.init_vectors(cfg.init_text, 1)
        else:
            vectors = checkpoint_vectors(self.engine, self.tcfg, step)
        with self.lora_at(step):
            return render(self.engine, cases, token=cfg.token, vectors=vectors, steps=cfg.sampler_steps,
                          cfg_scale=cfg.cfg_scale)

    def lora_at(self, step: int | None):
        """A pivotal run's checkpoint renders with its LoRA too (read back from the checkpoint's file, as a
        user would load it); the init-word and plain-word rows render the model alone."""
        if not step or self.tcfg is None or not self.tcfg.is_pivotal:
            return contextlib.nullcontext()
        path = lora_checkpoint_path(self.tcfg.run_dir, self.tcfg.name, step)
        lora = load_lora(path, unet_config=self.engine.unet.config, text_prefixes=TEXT_PREFIXES[self.engine.family])
        return Adapters(self.engine.lora_modules(self.tcfg.lora_targets), lora.modules, 0.0).attached()


def checkpoint_vectors(engine, tcfg, step: int):
    path = checkpoint_path(tcfg.run_dir, tcfg.name, step, tcfg.save_format)
    return match_to_model(load_embedding(path), engine.encoder_widths).vectors


# ---------------------------------------------------------------------- the benchmark
@dataclass
class Row:
    label: str  # "init word 'shape'", "step 100", "word 'triangle'"
    step: int | None
    figures: dict[str, float]
    images: list
    cases: list[Case] = dataclasses.field(default_factory=list)


def run_quality(target, classifier, cfg: QualityConfig, *, progress: Callable[[str], None] = lambda _msg: None,
                clip=None, clip_name: str = "") -> dict:
    """Train through ``target``, render and score every checkpoint; write the grid and report.json to ``cfg.out``.
    ``clip`` (a ``lib_ti.scoring.clip.Clip``): also the CLIP scores of the same renders and their rank correlation
    with the classifier's."""
    out = Path(cfg.out)
    if target.name == "webui" and dict(cfg.train_settings).get("mode") == "pivotal":
        raise TIError("bench quality --engine webui renders the published embedding only, not a LoRA: run mode "
                      "pivotal with --engine standalone")
    t0 = time.perf_counter()
    data_dir = write_concept_images(cfg, out / "images")
    progress(f"training {target.token(cfg)!r} from {cfg.num_images} images of a {cfg.concept}, "
             f"init word {cfg.init_text!r}")
    t_train = time.perf_counter()
    trained, tcfg = target.train(cfg, data_dir)
    train_s = time.perf_counter() - t_train
    rows = _render_rows(target, classifier, cfg, progress)
    if clip is not None:
        add_clip_scores(clip, rows, cfg, [Image.open(p).convert("RGB") for p in sorted(data_dir.glob("*.png"))])
    report = _report(cfg, tcfg, rows, trained, train_s, time.perf_counter() - t0, target)
    if clip is not None:
        report["clip"] = clip_agreement(report["rows"], clip_name)
    report["grid"] = str(_write_grid(cfg, rows, out / "grid.png"))
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _render_rows(target, classifier, cfg: QualityConfig, progress) -> list[Row]:
    token_prompts = token_cases(cfg, cfg.token)
    plans: list[tuple[str, int | None, list[Case]]] = [(f"init word '{cfg.init_text}'", 0, token_prompts)]
    plans += [(f"step {s}", s, token_prompts) for s in cfg.eval_steps]
    plans.append((f"word '{cfg.concept}'", None, token_cases(cfg, cfg.concept)))
    rows = []
    for label, step, cases in plans:
        progress(f"rendering {len(cases)} prompts: {label}")
        images = target.render(cfg, cases, step)
        rows.append(Row(label, step, score(classify(classifier, images), cases), images, cases))
    return rows


def edit_texts(cases: list[Case]) -> list[str]:
    """What editability compares each render with: its prompt's colour and background, the shape unnamed."""
    return [f"a {phrase(GENERIC_SHAPE, c.colour, c.background)}" for c in cases]


def add_clip_scores(clip, rows: list[Row], cfg: QualityConfig, training_images: list) -> None:
    """Each row's ``clip_fidelity`` and ``clip_editability`` (module docstring), from the renders it holds."""
    reference = clip.image_features(training_images)
    for row in rows:
        feats = clip.image_features(row.images)
        row.figures["clip_fidelity"] = float((feats @ reference.T).mean())
        texts = clip.text_features(edit_texts(row.cases))
        row.figures["clip_editability"] = float((feats * texts).sum(dim=1).mean())


CLIP_PAIRS = (("clip_fidelity", "shape"), ("clip_editability", "colour"), ("clip_editability", "background"))


def clip_agreement(rows: list[dict], clip_name: str) -> dict:
    """Spearman's rank correlation between each CLIP score and the classifier's figure it should track, over the
    checkpoints (not the init word nor the plain word rows); None where undefined (a constant column)."""
    checkpoints = [r for r in rows if r["step"]]
    rho = {f"{a}~{b}": spearman([r[a] for r in checkpoints], [r[b] for r in checkpoints]) for a, b in CLIP_PAIRS}
    return {"model": clip_name, "checkpoints": len(checkpoints),
            "spearman": {k: None if v is None else round(v, 3) for k, v in rho.items()}}


def _report(cfg: QualityConfig, tcfg, rows: list[Row], trained: Trained, train_s: float, total_s: float,
            target) -> dict:
    if isinstance(tcfg, TrainConfig):
        defaults = TrainConfig().to_dict()
        settings = {"train_settings_not_default": {k: v for k, v in tcfg.to_dict().items() if v != defaults[k]}}
    else:  # another trainer (the webui's built-in): its own arguments, all of them
        settings = {"host_train_settings": tcfg}
    figures = [{"label": r.label, "step": r.step, **{k: round(v, 4) for k, v in r.figures.items()}} for r in rows]
    return {
        "bench": asdict(cfg), "engine": target.name, "model": target.model, "token": target.token(cfg),
        "prompts": list(TOKEN_TEMPLATES), **settings, "steps_done": trained.steps_done,
        "embedding": trained.embedding, "train_wall_s": round(train_s, 1),
        "train_s_per_step": round(train_s / max(trained.steps_done, 1), 4), "total_wall_s": round(total_s, 1),
        "rows": figures, "milestones": milestones(figures),
    }


def milestones(rows: list[dict], target: float = TARGET) -> dict:
    """The first checkpoint with shape and colour both >= ``target`` (None: none), and the best of each, with
    its step: the figures the comparison of trainers reads."""
    checkpoints = [r for r in rows if r["step"]]  # not the init word (step 0) nor the plain word (None)
    first = next((r["step"] for r in checkpoints if r["shape"] >= target and r["colour"] >= target), None)
    out: dict = {"target": target, "first_step_shape_and_colour": first}
    for key in ("shape", "colour"):
        best = max(checkpoints, key=lambda r: (r[key], -r["step"]), default=None)
        out[f"best_{key}"] = None if best is None else {"step": best["step"], key: best[key],
                                                         "other": best["colour" if key == "shape" else "shape"]}
    return out


def _write_grid(cfg: QualityConfig, rows: list[Row], path: Path) -> Path:
    labels = [f"{r.label}\nshape {r.figures['shape']:.2f}\ncolour {r.figures['colour']:.2f}\n"
              f"background {r.figures['background']:.2f}" for r in rows]
    title = (f"{cfg.token} (init '{cfg.init_text}', {cfg.num_images} images of a {cfg.concept}): "
             f"'{TOKEN_TEMPLATES[0]}', first {GRID_COLUMNS} of {cfg.renders} prompts")
    return save_png(image_grid([r.images[:GRID_COLUMNS] for r in rows], labels, title), path)


def format_report(report: dict) -> str:
    with_clip = "clip" in report
    lines = [f"{'':<22}{'shape':>7}{'colour':>8}{'backgr.':>9}{'all':>6}"
             + (f"{'clip fid.':>11}{'clip edit.':>11}" if with_clip else "")]
    for r in report["rows"]:
        lines.append(f"{r['label']:<22}{r['shape']:>7.2f}{r['colour']:>8.2f}{r['background']:>9.2f}{r['all']:>6.2f}"
                     + (f"{r['clip_fidelity']:>11.3f}{r['clip_editability']:>11.3f}" if with_clip else ""))
    bench = report["bench"]
    lines += [
        f"renders       {bench['renders']} prompts per row ({bench['sampler_steps']} Euler steps, "
        f"cfg {bench['cfg_scale']}): "
        + " | ".join(report["prompts"]),
        f"training      {report['steps_done']} steps in {report['train_wall_s']:.1f}s "
        f"({report['train_s_per_step']:.3f} s/step); " + _settings_text(report),
        _milestones_text(report["milestones"]),
        *([_clip_text(report["clip"])] if with_clip else []),
        f"engine        {report['engine']} on {report['model']}",
        f"total         {report['total_wall_s']:.1f}s; grid {report['grid']}; embedding {report['embedding']}",
    ]
    return "\n".join(lines)


def _clip_text(clip: dict) -> str:
    rho = ", ".join(f"{k.replace('clip_', '').replace('~', ' ~ ')} {'n/a' if v is None else f'{v:+.2f}'}"
                    for k, v in clip["spearman"].items())
    return (f"clip          {clip['model']}: Spearman over {clip['checkpoints']} checkpoints: {rho} (fidelity: "
            "to the training images; editability: to the prompt with 'shape' for the token)")


def _settings_text(report: dict) -> str:
    if "host_train_settings" in report:
        shown = {k: report["host_train_settings"][k] for k in HOST_SETTINGS_SHOWN}
        return f"the host's own trainer with {shown} (all in report.json)"
    return f"settings other than the defaults: {report['train_settings_not_default']}"


def _milestones_text(m: dict) -> str:
    first = m["first_step_shape_and_colour"]
    best = [f"best {k} {m[f'best_{k}'][k]:.2f} at step {m[f'best_{k}']['step']}" for k in ("shape", "colour")
            if m[f"best_{k}"]]
    reached = f"step {first}" if first is not None else "not within the steps scored"
    return f"milestones    shape and colour >= {m['target']}: {reached}; " + "; ".join(best)


def parse_train_settings(items: list[str]) -> tuple[tuple[str, object], ...]:
    settings = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TIError(f"--train-set {item!r} must be KEY=VALUE, e.g. template=captions")
        settings.append((key.strip().replace("-", "_"), yaml.safe_load(value) if value.strip() else ""))
    return tuple(settings)


def load_micro_engine(model: str, threads: int = 1):
    """The micro model on the CPU. One thread by default: its tensors (8x8 latents, 64 channels) are too
    small to split between cores, and a second thread that waits for a busy core made renders 30x slower
    on a shared 2-core machine (measured)."""
    if threads < 1:
        raise TIError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return StandaloneEngine.load(model, device=torch.device("cpu"))
