"""``python -m lib_ti bench suite``: a matrix of ``bench speed`` runs in one command, as one table.

Made for a machine lent for a few minutes (a GPU with its own torch and no network): every
configuration runs in a fresh process (its own peak memory, and an out-of-memory error ends only that
row), rows that would not fit the time budget are listed as not run, and the table gives useful MFU:
images/s x the ideal TI FLOPs per image (performance.md, 2.3) / the peak this device reaches on a large
matmul, measured here in the same dtype. The ``cpu`` preset is the same suite on tiny models, a dry run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import TIError, say
from .limits import matmul_peak_tflops
from .speed import SpeedSettings

# Ideal FLOPs of one TI training image (UNet forward + activation-only backward + text encoders; no VAE,
# no recompute, no weight grads), TFLOP, from performance.md 2.3; (sd15, 128) from issue 15's count.
IDEAL_TFLOP = {("sd15", 512): 1.70, ("sdxl", 1024): 14.5, ("sd15", 128): 0.1177}


def _gpu_rows() -> list[SpeedSettings]:
    sd15 = SpeedSettings(arch="sd15", resolution=512, steps=30, warmup=5, precision="bf16", weights="bf16")
    sdxl = replace(sd15, arch="sdxl", resolution=1024, steps=15)
    return [
        sd15, replace(sd15, batch_size=4),
        replace(sd15, precision="fp16", weights="fp16"), replace(sd15, batch_size=4, precision="fp16", weights="fp16"),
        replace(sd15, batch_size=4, gradient_checkpointing=True),
        replace(sd15, batch_size=4, compile="default", warmup=8),
        replace(sd15, compile="reduce-overhead", warmup=8),
        replace(sd15, reproduce="builtin", precision="fp16", weights="fp16"),
        sdxl, replace(sdxl, gradient_checkpointing=True),
        replace(sdxl, gradient_checkpointing=True, precision="fp16", weights="fp16"),
        replace(sdxl, gradient_checkpointing=True, compile="default", warmup=6),
    ]


def _cpu_rows() -> list[SpeedSettings]:
    tiny = SpeedSettings(arch="tiny-sd1", resolution=64, steps=5, warmup=2, precision="fp32", device="cpu")
    return [tiny, replace(tiny, batch_size=2), replace(tiny, gradient_checkpointing=True),
            replace(tiny, precision="bf16", weights="bf16"), replace(tiny, reproduce="builtin"),
            replace(tiny, arch="tiny-sdxl")]


PRESETS: dict[str, Callable[[], list[SpeedSettings]]] = {"gpu": _gpu_rows, "cpu": _cpu_rows}


@dataclass
class Row:
    settings: SpeedSettings
    figures: dict | None = None
    error: str = ""  # the last line the failed run printed, or why it did not run

    @property
    def label(self) -> str:
        s = self.settings
        parts = [s.arch, f"{s.resolution}px", f"b{s.batch_size}", s.precision]
        parts += ["GC"] if s.gradient_checkpointing else []
        parts += [f"compile {s.compile}"] if s.compile else []
        parts += ["built-in reproduction"] if s.reproduce else []
        return " ".join(parts)


def run_suite(rows: list[SpeedSettings], out: Path, *, budget_s: float, row_timeout_s: float = 150,
              run_one: Callable[[SpeedSettings, Path, float], tuple[dict | None, str]] | None = None) -> list[Row]:
    """Run each configuration while the budget lasts; ``run_one(settings, json_path, timeout) -> (figures,
    error)`` defaults to a fresh ``python -m lib_ti bench speed`` process. No row may take more than
    ``row_timeout_s``: a compile that hangs must not eat the rows after it."""
    run_one = run_one or _run_in_process_of_its_own
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    results = []
    for i, settings in enumerate(rows):
        row = Row(settings)
        left = deadline - time.monotonic()
        if left < 20:  # not even a model build fits
            row.error = "not run: the time budget was spent"
        else:
            say(f"suite {i + 1}/{len(rows)}: {row.label}")
            row.figures, row.error = run_one(settings, out / f"row-{i + 1:02d}.json", min(left, row_timeout_s))
        results.append(row)
    return results


def _run_in_process_of_its_own(settings: SpeedSettings, json_path: Path, timeout: float) -> tuple[dict | None, str]:
    args = [sys.executable, "-m", "lib_ti", "bench", "speed", "--json", str(json_path)]
    for key, value in asdict(settings).items():
        if value in ("", False) or (key == "arch" and settings.model):  # defaults; --model and --arch exclude
            continue
        args += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"stopped after {timeout:.0f} s (the row's time limit or the suite's budget)"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return None, lines[-1][:300] if lines else f"exit code {proc.returncode}"
    return json.loads(json_path.read_text()), ""


def useful_mfu(row: Row, peaks: dict[str, float]) -> float | None:
    """images/s x ideal TFLOP per image / measured peak; None where the ideal FLOPs are not known."""
    s, f = row.settings, row.figures
    ideal = IDEAL_TFLOP.get((s.arch, s.resolution))
    peak = peaks.get(s.precision)
    if f is None or ideal is None or not peak:
        return None
    return f["images_per_s"] * ideal / peak


def format_table(results: list[Row], peaks: dict[str, float]) -> str:
    lines = ["| configuration | steps/s | images/s | useful MFU | peak memory (GiB) | first step (s) | note |",
             "|---|---|---|---|---|---|---|"]
    for row in results:
        f = row.figures
        if f is None:
            lines.append(f"| {row.label} | | | | | | {row.error} |")
            continue
        mfu = useful_mfu(row, peaks)
        memory = (f"{f['peak_allocated_gb']:.2f} alloc / {f['peak_reserved_gb']:.2f} reserved"
                  if "peak_allocated_gb" in f else f"{f['peak_rss_gb']:.2f} RSS")
        lines.append(f"| {row.label} | {f['steps_per_s_median']:.2f} | {f['images_per_s']:.2f} | "
                     f"{'' if mfu is None else f'{mfu:.1%}'} | {memory} | {f['time_to_first_step_s']:.1f} | |")
    lines.append("")
    lines.append("Peaks (square matmul, TFLOP/s): " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(peaks.items())))
    return "\n".join(lines)


def run(preset: str, out: Path, *, budget_s: float, row_timeout_s: float = 150, only: list[int] | None = None) -> str:
    """The whole suite: peaks, rows, the table (also written to ``out/suite.md`` and ``out/suite.json``)."""
    if preset not in PRESETS:
        raise TIError(f"bench suite --preset {preset!r} is unknown: use one of {', '.join(PRESETS)}")
    rows = PRESETS[preset]()
    if only:
        bad = [i for i in only if not 1 <= i <= len(rows)]
        if bad:
            raise TIError(f"bench suite --only {bad[0]} is not a row of preset {preset!r}: use 1 to {len(rows)}")
        rows = [rows[i - 1] for i in only]
    device = rows[0].device
    peaks: dict[str, float] = {p: matmul_peak_tflops(device, p) for p in sorted({r.precision for r in rows})}
    results = run_suite(rows, out, budget_s=budget_s, row_timeout_s=row_timeout_s)
    table = format_table(results, peaks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(table + "\n")
    (out / "suite.json").write_text(json.dumps({"peaks_tflops": peaks, "rows": [
        {"settings": asdict(r.settings), "figures": r.figures, "error": r.error} for r in results]}, indent=2) + "\n")
    return table
