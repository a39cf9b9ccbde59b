"""One typed, validated config object for a training run.

Every field has a default and a one-line reason. ``TrainConfig(...)`` validates on
construction, so a config that exists is a config that can run; file-system checks
(does the data folder exist?) are separate, in ``check_paths``, so a config can be
built and saved on a machine that does not have the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any, Literal, NoReturn

from .buckets import bucket_sizes, check_bucket_sides, check_side, side_limits
from .errors import TIError, shown
from .families import ENCODER_KEYS
from .fileio import write_text
from .options import bad, check_types, option
from .schedule import parse_schedule

Precision = Literal["auto", "fp32", "fp16", "bf16"]
ClipMode = Literal["none", "value", "norm"]
Crop = Literal["center", "random", "squash"]
LatentSampling = Literal["random", "deterministic", "once"]
Timesteps = Literal["stratified", "uniform"]
Optimizer = Literal["adamw", "prodigy"]
SaveFormat = Literal["safetensors", "pt"]
Mode = Literal["embedding", "pivotal"]
LORA_TARGETS = ("attn", "ff", "text")  # formats.lora.TARGET_PATTERNS names the layers of each

# Prompt names match as text in prompts: keep them to characters every host and file system accepts
# (matched whole: "$" would let a final newline through), and never a name Windows reserves for a device
# ("con", "nul.txt", ...: most webui users are on Windows, where such a file cannot be made).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,63}")
WINDOWS_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                              *(f"lpt{i}" for i in range(1, 10))})

# Limits no real run reaches, so that a typo cannot exhaust memory or time after the model has loaded.
MAX_TEXT = 10_000  # characters of any text option (prompts, paths, schedules)
MAX_REPEATS = 10_000
MAX_BATCH = 1024  # batch_size, and grad_accum
MAX_RANDOM_CROPS = 100
MAX_PREVIEW_STEPS = 1000
MAX_SEED = 2**63 - 1  # torch generators take 64 bits
MAX_CONFIG_FILE = 1024 * 1024  # bytes of a --config file


# Sections group the fields in the webui tab: basics on top, the others folded.
BASICS, TRAINING, LORA, DATA, SAVING = "Basics", "Training", "LoRA (pivotal mode)", "Data", "Saving and previews"
# Field metadata: resume=True may change when a run is resumed (how long, the schedules, how often to
# save, log and preview: nothing that changes what a step computes); path=True compares as a path.


@dataclass
class TrainConfig:
    # What to train, from what
    name: str = option("my-embedding", "the prompt word that triggers the embedding, and the file name",
                       label="Embedding name", section=BASICS)
    init_text: str = option("*", 'words whose token vectors start the embedding ("" = zeros)',
                            label="Initialization text", section=BASICS,
                            ui_help="words whose token vectors start the embedding (empty: zeros)")
    num_vectors: int = option(1, "vectors per token: more = more capacity, fewer prompt tokens left",
                              label="Vectors per token", section=BASICS)
    overwrite: bool = option(False, "allow replacing an existing embedding / run folder", label="Overwrite existing",
                             section=BASICS, resume=True)
    init_from: str = option("", "an existing embedding file to continue training from",
                            label="Continue from embedding (optional)", section=BASICS, path=True)
    data_dir: str = option("", "folder of images, with optional .txt captions or metadata.jsonl",
                           label="Dataset folder", section=BASICS, aliases=("--data",), path=True)
    template: str = option("auto", "auto = use the images' captions if any (captions, object_filewords), else object; "
                           "or a built-in set (object, style, *_filewords, captions, name) or a file",
                           label="Prompt template", section=BASICS)
    model: str = option("", "standalone engine: diffusers folder or single-file checkpoint", ui=False, path=True)
    mode: Mode = option("embedding", "embedding = textual inversion alone; pivotal = the embedding and a LoRA "
                        "trained together (pivotal tuning): two files, <name> and <lora:<name>-lora:1>",
                        label="Training mode", section=BASICS)

    # How long and how fast
    steps: int = option(1000, "optimizer steps (the learning-rate schedule may end training earlier)",
                        label="Max steps", section=TRAINING, resume=True)
    batch_size: int = option(1, "images per micro-batch", section=TRAINING)
    grad_accum: int = option(1, "micro-batches per optimizer step; the loss is divided by this",
                             label="Gradient accumulation", section=TRAINING)
    learning_rate: str = option("0.005", 'webui schedule syntax: "0.05:10, 0.02:20, 0.005:200"', section=TRAINING,
                                resume=True, ui_help="one rate, or rate:until-step pairs such as "
                                "0.05:10, 0.02:20, 0.005:200")
    optimizer: Optimizer = option("adamw", "adamw, or prodigy (needs the prodigyopt package; use learning rate 1.0 "
                                  "with it)", section=TRAINING)
    weight_decay: float = option(0.0, "0 keeps vector norms where the text encoder expects them", section=TRAINING)
    clip_mode: ClipMode = option("none", "gradient clipping: none, value or norm (applied after unscaling)",
                                 label="Gradient clipping", section=TRAINING)
    clip_value: str = option("0.1", "threshold schedule, same syntax as the learning rate", label="Clipping threshold",
                             section=TRAINING, resume=True)
    min_snr_gamma: float = option(0.0, "0 = off; 5 is the usual value (Hang et al. 2023)", label="Min-SNR gamma",
                                  section=TRAINING)
    precision: Precision = option("auto", "compute dtype: bf16 = the frozen weights held in bfloat16 for the run "
                                  "(in the webui restored bit for bit after), vectors, optimizer and loss float32: "
                                  "about 2x fp32 on CPUs with AVX-512 BF16 or AMX, and GPUs; fp16 = GPU, with "
                                  "loss scaling; auto = bf16 (fp16 where it lacks bf16) on a GPU, fp32 on a CPU",
                                  section=TRAINING,
                                  setting=True)
    gradient_checkpointing: bool = option(False, "trade ~45% speed for memory; only when memory asks",
                                          section=TRAINING)
    timesteps: Timesteps = option("uniform", "how each sample's noise level is drawn: uniform = independent "
                                  "draws, as the webui's own trainer does; stratified = a low-discrepancy sequence "
                                  "over the run (any stretch of steps covers the levels evenly, the same expected "
                                  "loss; on the micro model within noise of uniform)",
                                  label="Timestep sampling", section=TRAINING)
    noise_offset: float = option(0.0, "0 = off; 0.05-0.1 lets the model learn darker and brighter images than "
                                 "plain noise allows (added per image and channel)", section=TRAINING)
    seed: int = option(0, "seeds data order, noise and timesteps: same seed, same run", section=TRAINING)
    train_encoders: list[str] = option(help="SDXL: subset of clip_l/clip_g to train; [] = all", factory=list,
                                       label="Text encoders to train", section=TRAINING,
                                       ui_help="SDXL: train both encoders' vectors, or one (the other keeps its "
                                       "initial vectors)")

    # The LoRA trained with the embedding (mode pivotal)
    lora_rank: int = option(4, "rank of each adapter: more = more capacity, a larger file", label="LoRA rank",
                            section=LORA)
    lora_alpha: float = option(0.0, "adapter scale alpha/rank; 0 = the rank (scale 1)", label="LoRA alpha",
                               section=LORA)
    lora_dropout: float = option(0.0, "dropout on each adapter's input while training", label="LoRA dropout",
                                 section=LORA)
    lora_targets: list[str] = option(help="layers with adapters: attn (UNet attention projections), ff (UNet "
                                     "feed-forward), text (text encoders' attention)", factory=lambda: ["attn"],
                                     label="LoRA targets", section=LORA, choices=LORA_TARGETS)
    lora_learning_rate: str = option("0.0001", "the LoRA's schedule, same syntax as the learning rate (prodigy: 1.0)",
                                     label="LoRA learning rate", section=LORA, resume=True)
    ti_fraction: float = option(0.5, "the embedding trains for this fraction of the planned steps, then only the "
                                "LoRA does (the pivotal-tuning recipe uses 0.5)", label="Embedding fraction",
                                section=LORA)

    # Data
    width: int = option(512, "training width in pixels (multiple of 8)", section=DATA)
    height: int = option(512, "training height in pixels (multiple of 8)", section=DATA)
    crop: Crop = option("center", "center or random crop to the training size, or squash (resize ignoring aspect, "
                        "like the webui)", section=DATA)
    flip: bool = option(False, "add mirrored copies (not for asymmetric subjects such as text)",
                        label="Add flipped copies", section=DATA)
    random_crops: int = option(4, 'crops precomputed per image when crop == "random"', label="Random crops per image",
                               section=DATA)
    repeats: int = option(1, "times each image is seen per epoch", label="Repeats per epoch", section=DATA)
    shuffle_tags: bool = option(False, "shuffle the comma-separated tags of each caption every step",
                                label="Shuffle caption tags", section=DATA)
    tag_dropout: float = option(0.0, "probability of dropping each caption tag (never all)",
                                label="Caption tag dropout", section=DATA)
    keep_tokens: int = option(0, "leading caption tags never shuffled or dropped", label="Keep first tags",
                              section=DATA)
    use_alpha_weight: bool = option(False, "PNG alpha as per-pixel loss weight", label="Use alpha as loss weight",
                                    section=DATA)
    latent_sampling: LatentSampling = option("random", "random = resample from the cached distribution each step",
                                             section=DATA)
    cache_latents_to_disk: bool = option(False, "also keep the encoded latents in the run folder, reused by the next "
                                         "run on the same data", label="Keep encoded images on disk", section=DATA)
    buckets: bool = option(False, "train each image at the 64-multiple size nearest its aspect, area <= width x "
                           "height (buckets)", label="Aspect-ratio buckets", section=DATA)
    bucket_min_side: int = option(0, "shortest bucket side, a multiple of 64 (0 = half the shorter training side)",
                                  label="Shortest bucket side", section=DATA)
    bucket_max_side: int = option(0, "longest bucket side, a multiple of 64 (0 = twice the longer training side)",
                                  label="Longest bucket side", section=DATA)

    # Saving and previews
    output_dir: str = option("", 'run folder: checkpoints, previews, loss.csv; "" = outputs/<name>',
                             label="Run folder", section=SAVING, resume=True, path=True,
                             ui_help="folder of this run's checkpoints, previews and loss log, inside the "
                             "extension's output folder; empty: the embedding's name")
    save_every: int = option(500, "0 = only the final save", label="Save a checkpoint every N steps", section=SAVING,
                             setting=True, resume=True)
    keep_last: int = option(3, "checkpoints kept (0 = all); the final embedding is always kept",
                            label="Checkpoints kept", section=SAVING, setting=True, resume=True)
    save_format: SaveFormat = option("safetensors", "safetensors (every tool loads it) or pt (the webui classic "
                                     "format)", section=SAVING)
    log_every: int = option(10, "loss logging interval; each log is one device sync",
                            label="Log the loss every N steps", section=SAVING, resume=True)
    preview_every: int = option(500, "0 = no previews", label="Preview every N steps", section=SAVING, setting=True,
                                resume=True)
    preview_prompt: str = option("", '"" = the first template line with the name', section=SAVING, txt2img="prompt",
                                 resume=True, ui_help="empty: the first training prompt, with the embedding's name")
    preview_negative_prompt: str = option("", "negative prompt of the preview renders", section=SAVING,
                                          txt2img="negative_prompt", resume=True)
    preview_steps: int = option(20, "sampling steps of a preview render", label="Preview sampling steps",
                                section=SAVING, txt2img="steps", resume=True)
    preview_sampler: str = option("", 'webui: sampler of the preview renders ("" = Euler); the headless engine always '
                                  "uses Euler", section=SAVING, txt2img="sampler_name", resume=True,
                                  ui_help="sampler of the preview renders, as in txt2img (empty: Euler)")
    preview_cfg_scale: float = option(7.0, "classifier-free guidance scale of a preview render",
                                      label="Preview CFG scale", section=SAVING, txt2img="cfg_scale", resume=True)
    preview_seed: int = option(0, "seed of the preview renders (fixed, so previews are comparable across steps)",
                               section=SAVING, txt2img="seed", resume=True)
    preview_width: int = option(0, "0 = training width", section=SAVING, txt2img="width", resume=True,
                                ui_help="0: the training width")
    preview_height: int = option(0, "0 = training height", section=SAVING, txt2img="height", resume=True,
                                 ui_help="0: the training height")

    def __post_init__(self) -> None:
        check_types(self, "config")
        self._check_values()

    # ------------------------------------------------------------------ validation
    def _check_values(self) -> None:
        self._check_name()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and len(value) > MAX_TEXT:
                _bad(f.name, value, f"it is {len(value)} characters long; use at most {MAX_TEXT}")
        _at_least(self, "num_vectors", 1, at_most=75)
        _at_least(self, "steps", 1)
        _at_least(self, "batch_size", 1, at_most=MAX_BATCH)
        _at_least(self, "grad_accum", 1, at_most=MAX_BATCH)
        _at_least(self, "random_crops", 1, at_most=MAX_RANDOM_CROPS)
        _at_least(self, "repeats", 1, at_most=MAX_REPEATS)
        _at_least(self, "seed", 0, at_most=MAX_SEED)
        _at_least(self, "preview_seed", -1, at_most=MAX_SEED)
        _at_least(self, "save_every", 0)
        _at_least(self, "keep_last", 0)
        _at_least(self, "log_every", 1)
        _at_least(self, "preview_every", 0)
        _at_least(self, "preview_steps", 1, at_most=MAX_PREVIEW_STEPS)
        _at_least(self, "keep_tokens", 0)
        for name in ("width", "height"):
            check_side("config", name, getattr(self, name))
        for name in ("preview_width", "preview_height"):
            check_side("config", name, getattr(self, name), zero_ok=True)
        if not 0.0 <= self.tag_dropout < 1.0:
            _bad("tag_dropout", self.tag_dropout, "use a probability in [0, 1)")
        if self.weight_decay < 0:
            _bad("weight_decay", self.weight_decay, "use 0 or a positive number")
        if self.min_snr_gamma < 0:
            _bad("min_snr_gamma", self.min_snr_gamma, "use 0 (off) or a positive number such as 5")
        unknown = set(self.train_encoders) - set(ENCODER_KEYS)
        if unknown:
            _bad("train_encoders", self.train_encoders, "name encoders among clip_l, clip_g (SDXL) or leave it empty")
        self._check_buckets()
        self._check_lora()
        if not 0.0 <= self.noise_offset <= 1.0:
            _bad("noise_offset", self.noise_offset, "use 0 (off) or a small number such as 0.05 (at most 1)")
        parse_schedule(self.learning_rate, what="learning rate")
        parse_schedule(self.clip_value, what="clip value")

    def _check_name(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            _bad("name", self.name, "use 1-64 letters, digits, '_', '-', '.' or spaces, starting with a letter or "
                 "digit")
        if self.name.split(".")[0].strip().lower() in WINDOWS_RESERVED:
            _bad("name", self.name, "Windows reserves it for a device (con, prn, aux, nul, com1-9, lpt1-9, also "
                 "before a dot), so no file can have it; choose another name")

    def _check_lora(self) -> None:
        _at_least(self, "lora_rank", 1, at_most=1024)
        if self.lora_alpha < 0:
            _bad("lora_alpha", self.lora_alpha, "use 0 (= the rank) or a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            _bad("lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        if not self.lora_targets or set(self.lora_targets) - set(LORA_TARGETS):
            _bad("lora_targets", self.lora_targets, f"name one or more of {', '.join(LORA_TARGETS)}")
        if not 0.0 < self.ti_fraction <= 1.0:
            _bad("ti_fraction", self.ti_fraction, "use a fraction in (0, 1]; 1 trains the embedding to the end")
        parse_schedule(self.lora_learning_rate, what="LoRA learning rate")

    def _check_buckets(self) -> None:
        check_bucket_sides("config", self.bucket_min_side, self.bucket_max_side)
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
    def is_pivotal(self) -> bool:
        return self.mode == "pivotal"

    @property
    def lora_scale_alpha(self) -> float:
        """The alpha written into the LoRA file: ``lora_alpha``, or the rank when it is 0."""
        return self.lora_alpha or float(self.lora_rank)

    @property
    def planned_steps(self) -> int:
        return parse_schedule(self.learning_rate).planned_steps(self.steps)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resumed(self, given: Mapping[str, Any]) -> tuple[TrainConfig, list[str]]:
        """This saved run's config with ``given``'s changes of resumable fields, and one note per change.

        A resumed run must compute what the uninterrupted run would have: any other difference (seed,
        data, template, size, ...) is refused, naming each one, before any work.
        """
        known = {f.name: f for f in fields(self)}
        changed: dict[str, Any] = {}
        for name, value in given.items():
            if name not in known:
                raise TIError(f"unknown config key {shown(name)}; valid keys are: {', '.join(sorted(known))}")
            if known[name].metadata.get("resume") and not _same(known[name], getattr(self, name), value):
                changed[name] = value
        refused = self.differences(given)
        if refused:
            diffs = "; ".join(f"{n}: run {shown(getattr(self, n))}, given {shown(given[n])}" for n in refused)
            free = ", ".join(f.name for f in fields(self) if f.metadata.get("resume"))
            raise TIError(f"resume continues the run with its own settings, and these differ from it: {diffs}. "
                          f"Leave them as the run has them (only {free} may change), or start a new run "
                          "(another name or output folder) to train with other settings")
        cfg = self.replace(**changed) if changed else self
        return cfg, [f"{n}: {shown(getattr(self, n))} -> {shown(v)}" for n, v in changed.items()]

    def differences(self, other: TrainConfig | Mapping[str, Any]) -> list[str]:
        """The fields a resumed run may not change (no ``resume`` metadata) whose value in ``other`` (a config,
        or some of its keys) differs from this run's; keys ``other`` does not give are the same."""
        given = other.to_dict() if isinstance(other, TrainConfig) else other
        return [f.name for f in fields(self) if f.name in given and not f.metadata.get("resume")
                and not _same(f, getattr(self, f.name), given[f.name])]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise TIError(f"unknown config key(s) {shown(unknown)}; valid keys are: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON, atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))
        else:
            write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(cls.read_file(path))

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """A config file's keys and values (YAML or JSON), checked only for being a mapping."""
        path = Path(path)
        if not path.is_file():
            raise TIError(f"config file {str(path)!r} does not exist")
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        if path.stat().st_size > MAX_CONFIG_FILE:
            raise TIError(f"config file {str(path)!r} is {path.stat().st_size} bytes, too large for a config "
                          f"(at most {MAX_CONFIG_FILE}); is it the right file?")
        try:
            text = path.read_text(encoding="utf-8")
            if kind == "YAML":
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # every way of being unreadable; the message never quotes the file
            raise TIError(f"config file {str(path)!r} is not valid {kind}{_where(exc)}: fix it there, or give "
                          f"another file") from None
        if not isinstance(data, dict):
            raise TIError(f"config file {str(path)!r} must hold a mapping of keys to values")
        return data


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
    check_output_dir(cfg)


def check_output_dir(cfg: TrainConfig) -> None:
    """The run folder can be made and written: it is no file, and lies below no file."""
    path = cfg.run_dir
    if path.exists() and not path.is_dir():
        _bad("output_dir", str(path), "it is a file; give a folder (it is created when missing)")
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        _bad("output_dir", str(path), f"{str(existing)!r} is a file, so no folder can be made inside it; give "
             "another folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        _bad("output_dir", str(path), f"this process may not write in {str(existing)!r}; give another folder")


# ---------------------------------------------------------------------- helpers
def _where(exc: Exception) -> str:
    """Where a YAML/JSON/UTF-8 error is, without the text there: " (line 3, column 7)"."""
    mark = getattr(exc, "problem_mark", None)  # yaml
    if mark is not None:
        return f" (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(exc, json.JSONDecodeError):
        return f" (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f" (not UTF-8 text at byte {exc.start})"
    if isinstance(exc, OSError):
        return f" ({exc.strerror or type(exc).__name__})"
    return ""


def _same(f: Field, saved: Any, given: Any) -> bool:
    """Equal as the run would use them: paths by where they point, numbers by value, "" and None alike."""
    if f.metadata.get("path") and saved and given:
        return Path(str(saved)).expanduser().resolve() == Path(str(given)).expanduser().resolve()
    return saved == given or (saved in ("", None) and given in ("", None))


def _bad(name: str, value: Any, fix: str) -> NoReturn:
    bad("config", name, value, fix)


def _at_least(cfg: TrainConfig, name: str, low: int, at_most: int | None = None) -> None:
    value = getattr(cfg, name)
    if value < low or (at_most is not None and value > at_most):
        bound = f"between {low} and {at_most}" if at_most is not None else f"at least {low}"
        _bad(name, value, f"use a whole number {bound}")
