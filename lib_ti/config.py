"""One typed, validated config object for a training run.

Every field has a default and a one-line reason. ``TrainConfig(...)`` validates on
construction, so a config that exists is a config that can run; file-system checks
(does the data folder exist?) are separate, in ``check_paths``, so a config can be
built and saved on a machine that does not have the data.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .buckets import bucket_sizes, side_limits
from .errors import TIError
from .schedule import parse_schedule

Precision = Literal["auto", "fp32", "fp16", "bf16"]
ClipMode = Literal["none", "value", "norm"]
Crop = Literal["center", "random", "squash"]
LatentSampling = Literal["random", "deterministic", "once"]
Optimizer = Literal["adamw", "prodigy"]
SaveFormat = Literal["safetensors", "pt"]

# Prompt names match as text in prompts: keep them to characters every host and file system accepts.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,63}$")


# What each field does, for --help and the UI's tooltips.
HELP: dict[str, str] = {
    'name': 'the prompt word that triggers the embedding, and the file name',
    'init_text': 'words whose token vectors start the embedding ("" = zeros)',
    'num_vectors': 'vectors per token: more = more capacity, fewer prompt tokens left',
    'init_from': 'an existing embedding file to continue training from',
    'train_encoders': 'SDXL: subset of clip_l/clip_g to train; [] = all',
    'model': 'standalone engine: diffusers folder or single-file checkpoint',
    'data_dir': 'folder of images, with optional .txt captions or metadata.jsonl',
    'output_dir': 'run folder: checkpoints, previews, loss.csv; "" = outputs/<name>',
    'overwrite': 'allow replacing an existing embedding / run folder',
    'steps': 'optimizer steps (the learning-rate schedule may end training earlier)',
    'grad_accum': 'micro-batches per optimizer step; the loss is divided by this',
    'learning_rate': 'webui schedule syntax: "0.05:10, 0.02:20, 0.005:200"',
    'weight_decay': '0 keeps vector norms where the text encoder expects them',
    'clip_value': 'threshold schedule, same syntax as the learning rate',
    'min_snr_gamma': '0 = off; 5 is the usual value (Hang et al. 2023)',
    'precision': 'autocast dtype: auto = bf16/fp16 on GPU, fp32 on CPU',
    'gradient_checkpointing': 'trade ~45% speed for memory; only when memory asks',
    'template': 'built-in set (object, style, *_filewords, captions, name) or a file',
    'flip': 'add mirrored copies (not for asymmetric subjects such as text)',
    'random_crops': 'crops precomputed per image when crop == "random"',
    'keep_tokens': 'leading caption tags never shuffled or dropped',
    'use_alpha_weight': 'PNG alpha as per-pixel loss weight',
    'latent_sampling': 'random = resample from the cached distribution each step',
    'save_every': '0 = only the final save',
    'keep_last': 'checkpoints kept (0 = all); the final embedding is always kept',
    'log_every': 'loss logging interval; each log is one device sync',
    'preview_every': '0 = no previews',
    'preview_prompt': '"" = the first template line with the name',
    'preview_width': '0 = training width',
    'batch_size': 'images per micro-batch',
    'optimizer': 'adamw, or prodigy (needs the prodigyopt package; use learning rate 1.0 with it)',
    'clip_mode': 'gradient clipping: none, value or norm (applied after unscaling)',
    'seed': 'seeds data order, noise and timesteps: same seed, same run',
    'width': 'training width in pixels (multiple of 8)',
    'height': 'training height in pixels (multiple of 8)',
    'crop': 'center or random crop to the training size, or squash (resize ignoring aspect, like the webui)',
    'repeats': 'times each image is seen per epoch',
    'shuffle_tags': 'shuffle the comma-separated tags of each caption every step',
    'tag_dropout': 'probability of dropping each caption tag (never all)',
    'cache_latents_to_disk': 'also keep the encoded latents in the run folder, reused by the next run on the same data',
    'buckets': 'train each image at the 64-multiple size nearest its aspect, area <= width x height (buckets)',
    'bucket_min_side': 'shortest bucket side, a multiple of 64 (0 = half the shorter training side)',
    'bucket_max_side': 'longest bucket side, a multiple of 64 (0 = twice the longer training side)',
    'save_format': 'safetensors (every tool loads it) or pt (the webui classic format)',
    'preview_negative_prompt': 'negative prompt of the preview renders',
    'preview_steps': 'sampling steps of a preview render',
    'preview_sampler': 'webui: sampler of the preview renders ("" = Euler); the headless engine always uses Euler',
    'preview_cfg_scale': 'classifier-free guidance scale of a preview render',
    'preview_seed': 'seed of the preview renders (fixed, so previews are comparable across steps)',
    'preview_height': '0 = training height',
}


@dataclass
class TrainConfig:
    # What to train
    name: str = "my-embedding"
    init_text: str = "*"
    num_vectors: int = 1
    init_from: str = ""
    train_encoders: list[str] = field(default_factory=list)

    # Where things are
    model: str = ""
    data_dir: str = ""
    output_dir: str = ""
    overwrite: bool = False

    # How long and how fast
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: str = "0.005"
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    clip_mode: ClipMode = "none"
    clip_value: str = "0.1"
    min_snr_gamma: float = 0.0
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0

    # Data
    template: str = "object"
    width: int = 512
    height: int = 512
    crop: Crop = "center"
    flip: bool = False
    random_crops: int = 4
    repeats: int = 1
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    keep_tokens: int = 0
    use_alpha_weight: bool = False
    latent_sampling: LatentSampling = "random"
    cache_latents_to_disk: bool = False
    buckets: bool = False
    bucket_min_side: int = 0
    bucket_max_side: int = 0

    # Saving and previews
    save_every: int = 500
    keep_last: int = 3
    save_format: SaveFormat = "safetensors"
    log_every: int = 10
    preview_every: int = 500
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler: str = ""
    preview_cfg_scale: float = 7.0
    preview_seed: int = 0
    preview_width: int = 0
    preview_height: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        self._check_values()

    # ------------------------------------------------------------------ validation
    def _check_values(self) -> None:
        if not NAME_PATTERN.match(self.name):
            _bad("name", self.name, "use 1-64 letters, digits, '_', '-', '.' or spaces, starting with a letter or digit")
        _at_least(self, "num_vectors", 1, at_most=75)
        _at_least(self, "steps", 1)
        _at_least(self, "batch_size", 1)
        _at_least(self, "grad_accum", 1)
        _at_least(self, "random_crops", 1)
        _at_least(self, "repeats", 1)
        _at_least(self, "save_every", 0)
        _at_least(self, "keep_last", 0)
        _at_least(self, "log_every", 1)
        _at_least(self, "preview_every", 0)
        _at_least(self, "preview_steps", 1)
        _at_least(self, "keep_tokens", 0)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value % 8:
                _bad(name, value, "use a multiple of 8 of at least 64 (the VAE downsamples by 8)")
        for name in ("preview_width", "preview_height"):
            value = getattr(self, name)
            if value and (value < 64 or value % 8):
                _bad(name, value, "use 0 (training size) or a multiple of 8 of at least 64")
        if not 0.0 <= self.tag_dropout < 1.0:
            _bad("tag_dropout", self.tag_dropout, "use a probability in [0, 1)")
        if self.weight_decay < 0:
            _bad("weight_decay", self.weight_decay, "use 0 or a positive number")
        if self.min_snr_gamma < 0:
            _bad("min_snr_gamma", self.min_snr_gamma, "use 0 (off) or a positive number such as 5")
        unknown = set(self.train_encoders) - {"clip_l", "clip_g", "clip_h"}
        if unknown:
            _bad("train_encoders", self.train_encoders, "name encoders among clip_l, clip_g (SDXL) or leave it empty")
        self._check_buckets()
        parse_schedule(self.learning_rate, what="learning rate")
        parse_schedule(self.clip_value, what="clip value")

    def _check_buckets(self) -> None:
        for name in ("bucket_min_side", "bucket_max_side"):
            value = getattr(self, name)
            if value and (value < 64 or value % 64):
                _bad(name, value, "use 0 (automatic) or a multiple of 64 (the UNet needs latents divisible by 8)")
        if self.bucket_min_side and self.bucket_max_side and self.bucket_max_side < self.bucket_min_side:
            _bad("bucket_max_side", self.bucket_max_side, f"use at least bucket_min_side={self.bucket_min_side}")
        if self.buckets:
            low, high = side_limits(self.width, self.height, self.bucket_min_side, self.bucket_max_side)
            if high < low:
                _bad("bucket_max_side", self.bucket_max_side, f"use at least the shortest bucket side, {low}")
            if low * low > self.width * self.height:  # not even a square bucket of the shortest side fits
                _bad("bucket_min_side", self.bucket_min_side, f"a {low}x{low} bucket is larger than the training area "
                     f"{self.width}x{self.height}; lower it or raise width/height")

    # ------------------------------------------------------------------ derived values
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("outputs") / self.name

    @property
    def bucket_list(self) -> list[tuple[int, int]]:
        """The (width, height) buckets of this run; [] when buckets are off."""
        return bucket_sizes(self.width, self.height, self.bucket_min_side, self.bucket_max_side) if self.buckets else []

    @property
    def planned_steps(self) -> int:
        return parse_schedule(self.learning_rate).planned_steps(self.steps)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TIError(f"unknown config key(s) {unknown}; valid keys are: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON, atomically."""
        from .fileio import write_text

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        else:
            write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise TIError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml and json raise different types; both mean "unreadable"
            raise TIError(f"config file {str(path)!r} is not valid {path.suffix[1:].upper() or 'JSON'}: {exc}") from None
        if not isinstance(data, dict):
            raise TIError(f"config file {str(path)!r} must hold a mapping of keys to values")
        return cls.from_dict(data)


def check_paths(cfg: TrainConfig, *, need_model: bool = True) -> None:
    """File-system checks that must pass before any model work."""
    if need_model and not cfg.model:
        _bad("model", cfg.model, "give a diffusers folder or a .safetensors/.ckpt checkpoint")
    if need_model and not Path(cfg.model).exists():
        _bad("model", cfg.model, "the path does not exist")
    if not cfg.data_dir or not Path(cfg.data_dir).is_dir():
        _bad("data_dir", cfg.data_dir, "give an existing folder of training images")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        _bad("init_from", cfg.init_from, "give an existing embedding file, or leave it empty to start from init_text")


# ---------------------------------------------------------------------- helpers
def _bad(name: str, value: Any, fix: str) -> None:
    raise TIError(f"config {name}={value!r} is invalid: {fix}")


def _at_least(cfg: TrainConfig, name: str, low: int, at_most: int | None = None) -> None:
    value = getattr(cfg, name)
    if value < low or (at_most is not None and value > at_most):
        bound = f"between {low} and {at_most}" if at_most is not None else f"at least {low}"
        _bad(name, value, f"use a whole number {bound}")


def _check_types(cfg: TrainConfig) -> None:
    """Check each field against its annotation; accept ints for floats (YAML writes 5, not 5.0)."""
    for name, hint in _resolve_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if get_origin(hint) is Literal:
            if value not in get_args(hint):
                _bad(name, value, f"choose one of {', '.join(map(str, get_args(hint)))}")
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, name, float(value))
        elif hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(cfg, name, str(value))  # "learning_rate: 0.005" in YAML is a float
        elif get_origin(hint) is list:
            if not isinstance(value, list):
                _bad(name, value, "give a list")
        elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            _bad(name, value, f"expected {hint.__name__}")


def _resolve_hints(cls: type) -> dict[str, Any]:
    import typing

    # Annotations are strings (``from __future__ import annotations``); resolve them once per class.
    return typing.get_type_hints(cls)
