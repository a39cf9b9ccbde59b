"""``python -m lib_ti bench speed``: time training steps the way performance.md's protocol asks.
(``bench quality``, embedding quality on the micro model, lives in ``micro/quality.py``.)

Fixed conditions: 16 synthetic images at the chosen resolution (no bucketing), template
"a photo of [name]", 4 vectors, previews and checkpoint saves off, warm-up steps excluded.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .. import events
from ..config import Precision, TrainConfig
from ..devices import DTYPES, choose_device, weights_dtype
from ..engines.standalone import StandaloneEngine, load_engine
from ..errors import TIError, say
from ..models.real import build_random_engine
from ..models.tiny import build_tiny_model
from ..trainer import train
from .limits import GemmCounter, floors, format_limits, matmul_peak_tflops

TINY_ARCHES = ("tiny-sd1", "tiny-sd2", "tiny-sdxl")
REAL_ARCHES = ("sd15", "sd21", "sdxl")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")
# "builtin": the webui's built-in trainer's step, reproduced on this engine (performance.md, 4.2): the
# UNet's weights get gradients (never used, never freed), checkpointing on, fp16 weights and GradScaler on
# a GPU. A reproduction, labelled so: for a ratio on machines where the webui cannot run.
REPRODUCTIONS = ("", "builtin")


@dataclass(frozen=True)
class SpeedSettings:
    model: str = ""  # a diffusers folder or single file; "" = the built-in ``arch``
    arch: str = "tiny-sd1"
    resolution: int = 128
    batch_size: int = 1
    steps: int = 20
    warmup: int = 3
    vectors: int = 4
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    weights: str = "auto"  # the frozen weights' dtype: auto (the precision's), fp32, fp16, bf16
    compile: str = ""  # "" (eager) or a torch.compile mode for the UNet
    reproduce: str = ""  # "" (this trainer) or "builtin"
    limits: bool = False  # also count the step's matrix products and give this device's floors (limits.py)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise TIError(f"bench needs --steps >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        if not self.model and self.arch not in TINY_ARCHES + REAL_ARCHES:
            raise TIError(f"bench --arch {self.arch!r} is unknown: use one of {', '.join(TINY_ARCHES + REAL_ARCHES)}")
        if self.limits and self.compile:
            raise TIError("bench --limits counts the products of an eager step: leave out --compile")
        for name, value, allowed in (("weights", self.weights, ("auto", *DTYPES)), ("compile", self.compile,
                                     COMPILE_MODES), ("reproduce", self.reproduce, REPRODUCTIONS)):
            if value not in allowed:
                raise TIError(f"bench --{name} {value!r} is unknown: use one of {', '.join(map(repr, allowed))}")


def run(settings: SpeedSettings) -> dict:
    """Build or load the model, train ``warmup + steps`` steps and return the figures."""
    device = choose_device(settings.device)
    with tempfile.TemporaryDirectory(prefix="ti-bench-") as tmp:
        return measure_speed(settings, device, Path(tmp))


def measure_speed(args: SpeedSettings, device: torch.device, tmp: Path) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine, label = build_engine(args, device, tmp)
    if args.compile:
        engine.unet = torch.compile(engine.unet, mode=None if args.compile == "default" else args.compile)
        label += f", compiled ({args.compile})"
    if args.reproduce:
        engine = BuiltinStep(engine)
        label += ", reproduction of the webui's built-in step"
    load_s = time.perf_counter() - t0
    data_dir = draw_images(tmp / "images", 16, args.resolution)
    template = tmp / "template.txt"
    template.write_text("a photo of [name]\n")
    cfg = TrainConfig(name="benchtoken", init_text="a photo", num_vectors=args.vectors, data_dir=str(data_dir),
                      output_dir=str(tmp / "run"), steps=args.warmup + args.steps, batch_size=args.batch_size,
                      template=str(template), width=args.resolution, height=args.resolution, save_every=0,
                      preview_every=0, log_every=args.warmup + args.steps, precision=args.precision,
                      gradient_checkpointing=args.gradient_checkpointing or bool(args.reproduce))
    record: dict = {"times": []}

    def on_event(event):
        if isinstance(event, events.Started):
            record["ready_s"] = event.seconds_to_ready
            record["t_started"] = time.perf_counter()
        elif isinstance(event, events.Step):
            record["times"].append(time.perf_counter())

    t_train = time.perf_counter()
    train(engine, cfg, on_event=on_event)
    figures = _figures(args, device, label, load_s, t_train, record)
    if args.limits:
        figures["limits"] = step_limits(engine, cfg, tmp, device)
    return figures


def step_limits(engine, cfg: TrainConfig, tmp: Path, device: torch.device) -> dict:
    """One more step of the same run, its matrix products counted (not timed: the counter slows it), and the
    floors this device sets for them (limits.py)."""
    counter = GemmCounter()
    counting = contextlib.ExitStack()

    def on_event(event):
        if isinstance(event, events.Started):
            counting.enter_context(counter)
        elif isinstance(event, events.Step):
            counting.close()

    data_dir = draw_images(tmp / "count-images", cfg.batch_size, cfg.width)
    with counting:
        train(engine, replace(cfg, data_dir=str(data_dir), output_dir=str(tmp / "count-run"), steps=1, log_every=1),
              on_event=on_event)
    flops_by_dtype: collections.Counter[torch.dtype] = collections.Counter()
    for g, calls in counter.counts.items():
        flops_by_dtype[g.dtype] += g.flops * calls
    main_dtype = flops_by_dtype.most_common(1)[0][0]  # the peak is measured in the dtype doing most of the work
    dtype_name = next(name for name, dtype in DTYPES.items() if dtype == main_dtype)
    return floors(counter.counts, device, matmul_peak_tflops(str(device), dtype_name))


def build_engine(args: SpeedSettings, device: torch.device, tmp: Path):
    """The engine to time and its label: a model from disk, a tiny model, or a real architecture (random weights)."""
    dtype = weights_dtype(args.weights, device, args.precision)
    if args.model:
        return load_engine(args.model, device, args.weights, precision=args.precision), Path(args.model).name
    if args.arch in TINY_ARCHES:
        path = build_tiny_model(args.arch.removeprefix("tiny-"), tmp / args.arch)
        return StandaloneEngine.load(path, device=device, dtype=dtype), f"{args.arch} (random weights)"
    say(f"building {args.arch} with random weights on {device}")
    return build_random_engine(args.arch, device=device, dtype=dtype), f"{args.arch} (random weights)"


class BuiltinStep:
    """An engine whose UNet weights get gradients during training, as the webui's built-in trainer's do
    (it never sets ``requires_grad_(False)`` on them): the backward pass computes and keeps their grads."""

    def __init__(self, engine: StandaloneEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    @contextlib.contextmanager
    def frozen(self):
        with self._engine.frozen():
            for p in self._engine.unet.parameters():
                p.requires_grad_(True)
            yield


def _figures(args: SpeedSettings, device: torch.device, label: str, load_s: float, t_train: float,
             record: dict) -> dict:
    times = record["times"]
    marks = [record["t_started"], *times]
    step_s = [b - a for a, b in itertools.pairwise(marks)][args.warmup:]
    window = times[-1] - (times[args.warmup - 1] if args.warmup else record["t_started"])
    peak = _peak_memory(device)
    return {
        "model": label, "device": _device_name(device), "torch": torch.__version__, "resolution": args.resolution,
        "batch_size": args.batch_size, "vectors": args.vectors, "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing or bool(args.reproduce), "weights": args.weights,
        "compile": args.compile, "reproduce": args.reproduce, "timed_steps": len(step_s),
        "steps_per_s_median": 1 / statistics.median(step_s), "steps_per_s_mean": len(step_s) / window,
        "images_per_s": args.batch_size * len(step_s) / window,
        "step_s_min": min(step_s), "step_s_max": max(step_s),
        "time_to_first_step_s": load_s + (times[0] - t_train),
        "model_load_s": load_s, "data_and_latents_s": record["ready_s"], "first_step_s": times[0] - record["t_started"],
        **peak,
    }


def draw_images(folder: Path, count: int, size: int) -> Path:
    """``count`` distinct synthetic images (coloured shapes) drawn with PIL."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            box = (x0, y0, x0 + rng.randrange(size // 4, size // 2), y0 + rng.randrange(size // 4, size // 2))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"{i:02d}.png")
    return folder


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource  # Unix only, and only needed on the CPU

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(f: dict) -> str:
    mem = (f"peak allocated {f['peak_allocated_gb']:.2f} GiB, reserved {f['peak_reserved_gb']:.2f} GiB"
           if "peak_allocated_gb" in f else f"peak RSS {f['peak_rss_gb']:.2f} GiB (whole process)")
    return "\n".join(
        [
            f"model       {f['model']} on {f['device']}, torch {f['torch']}",
            f"setup       {f['resolution']}px, batch {f['batch_size']}, {f['vectors']} vectors, "
            f"precision {f['precision']}, "
            f"gradient checkpointing {'on' if f['gradient_checkpointing'] else 'off'}",
            f"speed       {f['steps_per_s_median']:.3f} steps/s median, {f['steps_per_s_mean']:.3f} mean, "
            f"{f['images_per_s']:.3f} images/s over {f['timed_steps']} timed steps "
            f"(step {f['step_s_min']:.3f}-{f['step_s_max']:.3f}s)",
            f"first step  {f['time_to_first_step_s']:.2f}s = load {f['model_load_s']:.2f}s + data/latents "
            f"{f['data_and_latents_s']:.2f}s + step 1 {f['first_step_s']:.2f}s (+ overhead)",
            f"memory      {mem}",
            *(format_limits(f["limits"], 1 / f["steps_per_s_median"]) if "limits" in f else []),
        ]
    )
