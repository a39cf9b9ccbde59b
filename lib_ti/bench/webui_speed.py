"""``python -m lib_ti bench speed --engine webui --vs builtin``: this extension and the webui's built-in
trainer, each training the checkpoint the running webui has loaded, at equal settings (size, batch 1,
vectors, learning rate, the host's ``subject.txt`` template, latents cached once, no previews, one save
after the timed window), paired: ours, built-in, ours, built-in, ...

Each run's step times come from polling its progress (ours: ``/ti-trainer/v1/status``, the built-in:
``/sdapi/v1/progress``, whose ``job_no`` it sets after each step): s/step = (T[warmup + steps] -
T[warmup]) / steps, where T[k] is when step k was first seen. Where the webui runs on this machine (its
process found from the port, or given), its peak RSS per run comes from ``/proc/<pid>/status`` (VmHWM,
reset before each run through ``clear_refs``). Only HTTP and (for the built-in's step-0 file and the
memory figures) local files are used: nothing of the webui is imported, and it is never patched.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import TIError
from ..remote import builtin
from ..remote.client import WebuiClient

POLL_S = 0.25  # each poll is one request the webui serves: often enough for a window of ~10 steps
SCRATCH = "ti-bench-speed"  # sub-folder of the webui's embeddings folder for the built-in's step-0 copies


@dataclass(frozen=True)
class WebuiSpeedSettings:
    url: str = "http://127.0.0.1:7860"
    auth: str | None = None
    data_dir: str = ""  # images on the webui's machine, inside the folders its requests may read
    resolution: int = 128
    steps: int = 10  # timed steps
    warmup: int = 3
    vectors: int = 4
    pairs: int = 2
    precision: str = "auto"  # ours; the built-in always computes in the host's dtype
    learning_rate: str = "0.005"
    init_text: str = "a photo"
    vs: str = "builtin"  # "" times ours alone
    pid: int = 0  # the webui's process (0: found from the port when it runs here)

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise TIError("bench speed --engine webui needs --data DIR: a folder of images on the webui's machine "
                          "that its requests may read (inside its data folder or --ti-trainer-allowed-roots)")
        if self.steps < 1 or self.warmup < 1 or self.pairs < 1:
            raise TIError(f"bench speed --engine webui needs --steps, --warmup and --pairs >= 1, got {self.steps}, "
                          f"{self.warmup} and {self.pairs}")
        if self.vs not in ("", "builtin"):
            raise TIError(f"--vs {self.vs!r} is unknown: use builtin")

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 2  # the built-in saves at its last step: after the window


def run(s: WebuiSpeedSettings, progress: Callable[[str], None] = lambda _m: None) -> dict:
    client = WebuiClient(s.url, s.auth)
    flags = client.call("GET", "/sdapi/v1/cmd-flags")
    checkpoint = client.call("GET", "/sdapi/v1/options").get("sd_model_checkpoint")
    template = str(Path(flags["textual_inversion_templates_dir"]) / "subject.txt")
    pid = s.pid or webui_pid(s.url)
    stamp = time.strftime("%H%M%S")
    runs = []
    for pair in range(1, s.pairs + 1):
        for trainer in ["ours", *([s.vs] if s.vs else [])]:
            progress(f"pair {pair}: {trainer}, {s.total_steps} steps at {s.resolution}px")
            name = f"tibench-{trainer}-{stamp}-{pair}"
            timed = time_ours if trainer == "ours" else time_builtin
            runs.append({"pair": pair, "trainer": trainer, **timed(client, s, name, template, pid)})
    return {"checkpoint": checkpoint, "settings": {k: v for k, v in vars(s).items() if k != "auth"},
            "pid": pid, "runs": runs, "ratios": ratios(runs), "load": _load()}


# ---------------------------------------------------------------------- the two trainers
def time_ours(client: WebuiClient, s: WebuiSpeedSettings, name: str, template: str, pid: int) -> dict:
    body = {"name": name, "init_text": s.init_text, "num_vectors": s.vectors, "data_dir": s.data_dir,
            "template": template, "width": s.resolution, "height": s.resolution, "steps": s.total_steps,
            "batch_size": 1, "learning_rate": s.learning_rate, "latent_sampling": "once", "save_every": 0,
            "preview_every": 0, "log_every": s.total_steps, "overwrite": True, "output_dir": "ti-bench-speed",
            "precision": s.precision}
    state: dict = {}

    def start() -> None:
        state.update(client.call("POST", "/ti-trainer/v1/train", body))

    def poll() -> tuple[int, bool]:
        if not state:
            return 0, False
        status = client.call("GET", f"/ti-trainer/v1/status?run_id={state['run_id']}")
        state.update(status)
        return int(status.get("step") or 0), status["state"] not in ("queued", "running", "stopping")

    figures = _timed(start, poll, s, pid)
    figures["notes"] = [n for n in state.get("notes") or [] if n.startswith(("computing", "precision"))]
    if state.get("state") != "finished":
        figures["error"] = f"our run ended {state.get('state')}: {state.get('error')}"
    return figures


def time_builtin(client: WebuiClient, s: WebuiSpeedSettings, name: str, template: str, pid: int) -> dict:
    try:
        builtin.create_registered(client, name, vectors=s.vectors, init_text=s.init_text, scratch=SCRATCH)
    except TIError as exc:
        return {"error": str(exc)}
    log_dir = tempfile.mkdtemp(prefix="ti-bench-builtin-")
    body = builtin.train_body(name=name, data_dir=s.data_dir, log_dir=log_dir, steps=s.total_steps,
                              width=s.resolution, height=s.resolution, learning_rate=s.learning_rate,
                              template=Path(template).name)
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["file"] = builtin.final_file(builtin.train(client, body))
        except TIError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=call, daemon=True)

    def poll() -> tuple[int, bool]:
        state = client.call("GET", "/sdapi/v1/progress?skip_current_image=true").get("state") or {}
        step = int(state.get("job_no") or 0) if state.get("job") == "train-embedding" else 0
        return step, not worker.is_alive()

    try:
        figures = _timed(worker.start, poll, s, pid)
    finally:
        worker.join()
        shutil.rmtree(log_dir, ignore_errors=True)
    if "error" in outcome:
        figures["error"] = outcome["error"]
    elif figures.get("steps_seen", 0) < s.warmup + s.steps:  # its last step's count ends with its job: unseen
        figures["error"] = (f"the built-in trainer's API answered 200 but only {figures.get('steps_seen')} of "
                            f"{s.total_steps} steps were seen: a failure inside its loop is only in its console "
                            "('Error training embedding')")
    return figures


# ---------------------------------------------------------------------- timing and memory
def _timed(start: Callable[[], None], poll: Callable[[], tuple[int, bool]], s: WebuiSpeedSettings,
           pid: int) -> dict:
    """Start a run, poll its step until it is done; the step window's time per step and the memory figures."""
    baseline = _proc_kib(pid, "VmRSS")
    _reset_peak(pid)
    seen: dict[int, float] = {}
    t0 = time.perf_counter()
    start()
    done = False
    while not done:
        step, done = poll()
        now = time.perf_counter()
        for k in range(max(seen, default=0) + 1, step + 1):
            seen[k] = now
        if not done:
            time.sleep(POLL_S)
    figures: dict = {"steps_seen": max(seen, default=0)}
    end = s.warmup + s.steps
    if end in seen and s.warmup in seen:
        window = seen[end] - seen[s.warmup]
        if window < 4 * POLL_S:  # the steps came faster than polling can time them
            figures["error"] = f"{s.steps} steps took {window:.2f}s, too fast to time by polling: use more --steps"
        else:
            figures["s_per_step"] = window / s.steps
        figures["time_to_first_step_s"] = seen[1] - t0
    peak, after = _proc_kib(pid, "VmHWM"), _proc_kib(pid, "VmRSS")
    if peak and baseline and after:
        figures.update(baseline_rss_gib=baseline / 2**20, peak_rss_gib=peak / 2**20, after_rss_gib=after / 2**20)
    return figures


def ratios(runs: list[dict]) -> dict | None:
    """Per pair, the built-in's s/step over ours; min, median and max."""
    pairs: dict[int, dict] = {}
    for r in runs:
        pairs.setdefault(r["pair"], {})[r["trainer"]] = r.get("s_per_step")
    values = [p["builtin"] / p["ours"] for p in pairs.values() if p.get("builtin") and p.get("ours")]
    if not values:
        return None
    return {"pairs": values, "min": min(values), "median": statistics.median(values), "max": max(values)}


def webui_pid(url: str) -> int:
    """The process listening on the url's port, where it is this machine (Linux /proc); 0 when not found."""
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1") or not Path("/proc/net/tcp").exists():
        return 0
    port = parsed.port or 80
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: listening
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
            except OSError:
                continue
    return 0


def _proc_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [f"webui checkpoint {report['checkpoint']!r}, {s['resolution']}px, batch 1, {s['vectors']} vectors, "
             f"{s['steps']} timed steps after {s['warmup']}, our precision {s['precision']}, load {report['load']}",
             "| pair | trainer | s/step | time to first step | peak RSS | peak - baseline | after - baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r and "s_per_step" not in r:
            lines.append(f"| {r['pair']} | {r['trainer']} | failed: {r['error']} | | | | |")
            continue
        mem = (f"{r['peak_rss_gib']:.2f} GiB | {r['peak_rss_gib'] - r['baseline_rss_gib']:+.2f} | "
               f"{r['after_rss_gib'] - r['baseline_rss_gib']:+.2f}" if "peak_rss_gib" in r else "n/a | n/a | n/a")
        note = f" ({r['error']})" if "error" in r else ""
        lines.append(f"| {r['pair']} | {r['trainer']} | {r.get('s_per_step', float('nan')):.2f}{note} | "
                     f"{r.get('time_to_first_step_s', float('nan')):.1f} s | {mem} |")
    lines += sorted({f"ours: {n}" for r in report["runs"] for n in r.get("notes", [])})
    ratio = report["ratios"]
    if ratio:
        lines.append(f"built-in s/step / ours: median {ratio['median']:.2f} [min {ratio['min']:.2f}, max "
                     f"{ratio['max']:.2f}] over {len(ratio['pairs'])} pair(s)")
    return "\n".join(lines)
