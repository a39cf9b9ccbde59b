"""The pre-flight check: can this config train, and what will it train on? No model is loaded.

``check(cfg)`` looks at the files (images, captions, templates, model path), the numbers (learning
rate for the optimizer, estimated memory, epochs) and returns a ``PreflightReport``: structured
fields for the webui tab, ``format()`` for the console, ``ok`` (no blocking problem). It reads image
headers and decodes JPEGs at 1/8 scale, so a folder of a few hundred photos takes about a second.

Memory estimate (rough, +-50%; for choosing batch size and resolution, not a guarantee)::

    GiB = weights + activations + 1.0
    weights     = (UNet + text encoders) x 2 bytes (fp16) + VAE x 4 bytes (fp32), parameters below
    activations = per-image GiB at 512x512 (below) x batch_size x (width x height) / 512^2,
                  x 0.35 with gradient checkpointing

The per-image figures are what a UNet forward and backward keeps with PyTorch's scaled-dot-product
attention, as commonly reported for SD1.5/SD2/SDXL training; 1.0 GiB covers the CUDA context and
allocator slack. They are not measured by this project.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..buckets import Size, nearest_bucket
from ..buckets import describe as describe_buckets
from ..config import TrainConfig, check_output_dir
from ..errors import PREFIX, TIError
from ..families import FAMILIES
from ..images import UNREADABLE, ImageItem, discover, unreadable_reason
from ..schedule import parse_schedule
from ..templates import (
    FILEWORDS,
    NAME,
    has_name,
    is_auto,
    is_filewords_only,
    load_templates,
    names_embedding,
    resolve_template,
    uses_filewords,
)
from .reports import Skipped, skipped_lines

ACTIVATION_GIB_AT_512 = {"sd1": 2.5, "sd2": 2.5, "sdxl": 1.9}  # SDXL skips attention at the largest level
CHECKPOINTING_FACTOR = 0.35
OVERHEAD_GIB = 1.0
_GIB = 2**30

# Learning-rate ranges outside which a warning is due (AdamW on embedding vectors; Prodigy's multiplier).
ADAMW_LR = (1e-5, 0.1)
PRODIGY_LR = (0.1, 10.0)
MAX_UPSCALE = 4  # enlarging more than this shows as blur the embedding learns
_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    size: Size  # as trained: after EXIF rotation
    caption: str | None
    bucket: Size | None  # with buckets on: the size it trains at


@dataclass(frozen=True)
class MemoryEstimate:
    family: str
    guessed: bool  # the family was guessed from the resolution (no model to look at)
    weights_gib: float
    activations_gib: float
    overhead_gib: float = OVERHEAD_GIB
    on_cpu: bool = False  # the run computes on the CPU: the memory is RAM, and weights are float32

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.activations_gib + self.overhead_gib

    def describe(self) -> str:
        family = f"{self.family}, guessed from the resolution" if self.guessed else self.family
        where = "RAM (the run computes on the CPU)" if self.on_cpu else "GPU memory"
        return (f"about {self.total_gib:.1f} GiB of {where} ({family}: weights {self.weights_gib:.1f} + "
                f"activations {self.activations_gib:.1f} + overhead {self.overhead_gib:.1f})")


@dataclass
class PreflightReport:
    cfg: TrainConfig
    images: list[ImageInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    template: str = ""  # the template set training would use: cfg.template, or the one ``auto`` chooses
    template_note: str | None = None  # which set ``auto`` chose, and why
    memory: MemoryEstimate | None = None
    problems: list[str] = field(default_factory=list)  # any of these and training would fail
    warnings: list[str] = field(default_factory=list)  # it would train, but probably not as meant

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def captioned(self) -> int:
        return sum(info.caption is not None for info in self.images)

    @property
    def template_lines_with_trigger(self) -> int:
        return sum(has_name(line) for line in self.templates)

    @property
    def captions_with_trigger(self) -> int:
        return sum(names_embedding(info.caption, self.cfg.name) for info in self.images if info.caption is not None)

    @property
    def size_spread(self) -> tuple[Size, Size, Size] | None:
        """(smallest, median, largest) image size by area; None without images."""
        if not self.images:
            return None
        sizes = sorted((info.size for info in self.images), key=lambda s: (s[0] * s[1], s))
        return sizes[0], sizes[(len(sizes) - 1) // 2], sizes[-1]

    @property
    def upscaled(self) -> list[ImageInfo]:
        """Images smaller than the size they train at: they are enlarged, and look soft."""
        return [info for info in self.images if _scale(info, self.cfg) > 1.0]

    @property
    def bucket_counts(self) -> Counter:
        return Counter(info.bucket for info in self.images if info.bucket is not None)

    def format(self) -> str:
        return "\n".join(_report_lines(self))

    def to_dict(self) -> dict:
        spread = self.size_spread
        return {
            "ok": self.ok, "data_dir": self.cfg.data_dir, "usable": len(self.images),
            "skipped": [{"file": str(s.path), "reason": s.reason} for s in self.skipped],
            "captioned": self.captioned, "template": self.template, "template_lines": len(self.templates),
            "template_lines_with_trigger": self.template_lines_with_trigger,
            "captions_with_trigger": self.captions_with_trigger,
            "sizes": None if spread is None else dict(zip(("smallest", "median", "largest"), spread, strict=True)),
            "upscaled": [str(info.path) for info in self.upscaled],
            "buckets": {f"{w}x{h}": n for (w, h), n in sorted(self.bucket_counts.items())},
            "memory_gib": None if self.memory is None else round(self.memory.total_gib, 2),
            "problems": self.problems, "warnings": self.warnings,
        }


# ---------------------------------------------------------------------- the check
def check(cfg: TrainConfig, *, family: str | None = None, on_cpu: bool = False) -> PreflightReport:
    """Everything that can be known before loading a model. ``family`` (sd1/sd2/sdxl) when the caller
    knows it (the webui's loaded model); otherwise read from ``cfg.model``'s files, else guessed.
    ``on_cpu``: the run will compute on the CPU (the memory estimate is then RAM, in float32)."""
    if family is not None and family not in FAMILIES:
        raise TIError(f"model family {family!r} is unknown: use one of {', '.join(FAMILIES)}")
    report = PreflightReport(cfg)
    _check_paths(cfg, report)
    items = _discover(cfg, report)
    _check_templates(cfg, items, report)
    _check_images(cfg, items, report)
    _check_captions(cfg, report)
    _check_numbers(cfg, report)
    report.memory = estimate_memory(cfg, family, on_cpu=on_cpu)
    return report


def _check_paths(cfg: TrainConfig, report: PreflightReport) -> None:
    if cfg.model and not Path(cfg.model).exists():
        report.problems.append(f"model {cfg.model!r} does not exist: give a diffusers folder or a "
                               ".safetensors/.ckpt checkpoint")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        report.problems.append(f"init_from {cfg.init_from!r} does not exist: give an embedding file or leave it empty")
    try:
        check_output_dir(cfg)
    except TIError as e:
        report.problems.append(str(e).removeprefix(f"{PREFIX} "))
    if cfg.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        report.problems.append("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt "
                               "(or use optimizer 'adamw')")
    if not cfg.run_dir.is_dir():
        return
    from ..checkpoints import list_states  # imports torch: only when there is a run folder to look at

    states = list_states(cfg.run_dir, cfg.name)
    if states and not cfg.overwrite:
        report.warnings.append(f"run folder {str(cfg.run_dir)!r} already holds checkpoints of {cfg.name!r} (last at "
                               f"step {states[-1][0]}): training refuses to start over unless you resume it or allow "
                               "overwrite")


def _check_templates(cfg: TrainConfig, items: list[ImageItem], report: PreflightReport) -> None:
    report.template, report.template_note = resolve_template(cfg.template, {i.path.name: i.caption for i in items},
                                                             cfg.name)
    if is_auto(report.template):  # no images to choose from: the data folder's problem is reported
        return
    try:
        report.templates = load_templates(report.template)
    except TIError as e:
        report.problems.append(str(e).removeprefix(f"{PREFIX} "))
        return
    if not any(has_name(line) for line in report.templates) and not is_filewords_only(report.templates):
        report.problems.append(f"template {report.template!r}: no line contains [name], so the embedding would never "
                               "appear in a prompt; add [name] where it goes, e.g. 'a photo of a [name]'")


def _discover(cfg: TrainConfig, report: PreflightReport) -> list[ImageItem]:
    if not cfg.data_dir:
        report.problems.append("no data folder given (--data DIR): give the folder of training images")
        return []
    try:
        return discover(cfg.data_dir)
    except TIError as e:
        report.problems.append(str(e).removeprefix(f"{PREFIX} "))
        return []


def _check_images(cfg: TrainConfig, items: list[ImageItem], report: PreflightReport) -> None:
    buckets = cfg.bucket_list
    copies: dict[str, list[str]] = {}  # file hash -> names, the first one the original
    for item in items:
        try:
            size = probe(item.path)
        except UNREADABLE as e:
            report.skipped.append(Skipped(item.path, unreadable_reason(e)))
            continue
        copies.setdefault(hashlib.blake2b(item.path.read_bytes(), digest_size=16).hexdigest(), []).append(
            item.path.name
        )
        bucket = nearest_bucket(size, buckets) if buckets else None
        report.images.append(ImageInfo(item.path, size, item.caption, bucket))
    _warn_copies(copies, report)
    if items and not report.images:
        report.problems.append(f"none of the {len(items)} image(s) in {cfg.data_dir!r} can be read: nothing to "
                               "train on")
    blurred = [f"{info.path.name} ({_wh(info.size)}, {_scale(info, cfg):.0f}x)" for info in report.images
               if _scale(info, cfg) > MAX_UPSCALE]
    if blurred:
        report.warnings.append(f"{len(blurred)} image(s) will be enlarged more than {MAX_UPSCALE}x and look blurred: "
                               f"{_few(blurred)}; use larger sources or remove them")
    small = [n for size, n in report.bucket_counts.items() if n < cfg.batch_size]
    if small:
        report.warnings.append(f"{len(small)} bucket(s) hold fewer images than batch_size={cfg.batch_size}: their "
                               "batches are smaller")


def _warn_copies(copies: dict[str, list[str]], report: PreflightReport) -> None:
    for first, *others in (names for names in copies.values() if len(names) > 1):
        report.warnings.append(f"{_few(others)} {'is a copy' if len(others) == 1 else 'are copies'} of {first}: "
                               "trained on more often than the rest; remove the copies (prepare de-duplicates)")


def _check_captions(cfg: TrainConfig, report: PreflightReport) -> None:
    templates, images = report.templates, report.images
    if not templates or not images:
        return
    missing = [info.path.name for info in images if info.caption is None]
    if is_filewords_only(templates):
        unnamed = [info.path.name for info in images
                   if info.caption is not None and not names_embedding(info.caption, cfg.name)]
        if missing:
            report.problems.append(f"template {report.template!r} uses only {FILEWORDS}, but {len(missing)} image(s) "
                                   f"have no caption: {_few(missing)}; caption them or use a template with {NAME}")
        if unnamed:
            report.problems.append(f"template {report.template!r} uses only {FILEWORDS}, but {len(unnamed)} caption(s) "
                                   f"mention neither {NAME} nor {cfg.name!r}: {_few(unnamed)}; put {NAME} in them")
    elif uses_filewords(templates) and missing:
        report.warnings.append(f"{len(missing)} image(s) have no caption, so {FILEWORDS} is empty for them: "
                               f"{_few(missing)}")
    elif not uses_filewords(templates) and report.captioned:
        report.warnings.append(f"{report.captioned} image(s) have captions but template {report.template!r} has no "
                               f"{FILEWORDS}, so they are not used; e.g. use object_filewords or style_filewords")


def _check_numbers(cfg: TrainConfig, report: PreflightReport) -> None:
    schedule = parse_schedule(cfg.learning_rate)
    rates = sorted({piece.value for piece in schedule.pieces})
    low, high = PRODIGY_LR if cfg.optimizer == "prodigy" else ADAMW_LR
    odd = [rate for rate in rates if not low <= rate <= high]
    if odd and cfg.optimizer == "prodigy":
        report.warnings.append(f"learning rate {_rates(odd)} with Prodigy: Prodigy finds the step size itself and the "
                               "learning rate multiplies it; use 1.0")
    elif [rate for rate in odd if rate > high]:
        report.warnings.append(f"learning rate {_rates(odd)} is very high for AdamW on embedding vectors (usual: "
                               "0.005, up to 0.05 early in a schedule): the vectors will overshoot")
    elif odd:
        report.warnings.append(f"learning rate {_rates(odd)} is very low for AdamW on embedding vectors (usual: "
                               f"0.005): {cfg.planned_steps} steps will barely move them")
    note = schedule.describe_end(cfg.steps)
    if note:
        report.warnings.append(note)


def estimate_memory(cfg: TrainConfig, family: str | None = None, *, on_cpu: bool = False) -> MemoryEstimate:
    """The module docstring's formula for ``cfg`` on ``family`` (read from cfg.model, else guessed); on the CPU
    the UNet and text encoder weights are float32 (4 bytes a parameter, not 2)."""
    guessed = False
    if family is None:
        family = detect_family(cfg.model) if cfg.model else None
    if family is None:
        family, guessed = ("sdxl" if cfg.width * cfg.height >= 1024 * 1024 else "sd1"), True
    params = FAMILIES[family].params_m
    weights = ((params["unet"] + params["text"]) * (4 if on_cpu else 2) + params["vae"] * 4) * 1e6 / _GIB
    activations = ACTIVATION_GIB_AT_512[family] * cfg.batch_size * cfg.width * cfg.height / 512**2
    if cfg.gradient_checkpointing:
        activations *= CHECKPOINTING_FACTOR
    return MemoryEstimate(family, guessed, weights, activations, on_cpu=on_cpu)


def detect_family(model: str) -> str | None:
    """sd1/sd2/sdxl from a model's config files or checkpoint header, without loading weights; None if unsure."""
    path = Path(model)
    if path.is_dir():
        if (path / "text_encoder_2").is_dir():
            return "sdxl"
        config = path / "text_encoder" / "config.json"
        if config.is_file():  # SD2's OpenCLIP-H uses gelu, CLIP-L (SD1) quick_gelu
            return "sd2" if json.loads(config.read_text()).get("hidden_act") == "gelu" else "sd1"
        return None
    if path.suffix == ".safetensors" and path.is_file():
        keys = _safetensors_keys(path)
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return "sd2"
        if any(k.startswith("cond_stage_model.transformer.") for k in keys):
            return "sd1"
    return None


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a .safetensors header (8-byte length, then JSON): no weights are read."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            return list(json.loads(f.read(min(length, 100_000_000))))
    except (OSError, ValueError):
        return []


def probe(path: Path) -> Size:
    """The size an image trains at (EXIF rotation applied), decoding it to catch broken files.

    JPEGs decode at 1/8 scale (``draft``): a truncated or corrupt file still fails, in a
    fraction of the time.
    """
    with Image.open(path) as im:
        size = im.size
        orientation = im.getexif().get(_ORIENTATION, 1)
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    return (size[1], size[0]) if orientation in _TURNED else size


# ---------------------------------------------------------------------- helpers
def _scale(info: ImageInfo, cfg: TrainConfig) -> float:
    """How much the image is enlarged to cover the size it trains at (> 1 = upscaled)."""
    width, height = info.bucket or (cfg.width, cfg.height)
    return max(width / info.size[0], height / info.size[1])


def _few(labels: list[str], n: int = 3) -> str:
    return ", ".join(labels[:n]) + (f" and {len(labels) - n} more" if len(labels) > n else "")


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:g}" for rate in rates)


def _report_lines(report: PreflightReport) -> list[str]:
    cfg = report.cfg
    lines = [f"{PREFIX} pre-flight check of {cfg.data_dir!r} for {cfg.name!r}",
             f"  images: {len(report.images)} usable, {len(report.skipped)} skipped",
             *skipped_lines(report.skipped, indent="    ")]
    if report.images:
        n = len(report.images)
        lines.append(f"  captions: {report.captioned} of {n} images; "
                     f"template {report.template!r} {'uses' if uses_filewords(report.templates) else 'ignores'} them")
        if report.template_note:
            lines.append(f"  {report.template_note}")
        lines.append(f"  trigger {NAME}/{cfg.name!r}: in {report.template_lines_with_trigger} of "
                     f"{len(report.templates)} template lines, in {report.captions_with_trigger} of {report.captioned} "
                     "captions")
        smallest, median, largest = report.size_spread or ((0, 0),) * 3
        lines.append(f"  sizes: smallest {_wh(smallest)}, median {_wh(median)}, largest {_wh(largest)}; "
                     f"{len(report.upscaled)} smaller than the size they train at (upscaled)")
        if cfg.buckets:
            lines.append(f"  buckets: {describe_buckets(report.bucket_counts)}")
        epochs = cfg.planned_steps * cfg.batch_size * cfg.grad_accum / (n * cfg.repeats)
        lines.append(f"  steps: {cfg.planned_steps} x batch {cfg.batch_size * cfg.grad_accum} = {epochs:.1f} epochs of "
                     f"{n} images" + (f" x {cfg.repeats} repeats" if cfg.repeats > 1 else ""))
    lines.append(f"  learning rate: {cfg.learning_rate} ({cfg.optimizer})")
    if report.memory is not None:
        lines.append(f"  memory: {report.memory.describe()}")
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  problem: {p}" for p in report.problems]
    verdict = "ready to train" if report.ok else f"NOT ready: {len(report.problems)} problem(s) to fix first"
    return lines + [f"{PREFIX} {verdict}"]


def _wh(size: Size) -> str:
    return f"{size[0]}x{size[1]}"
