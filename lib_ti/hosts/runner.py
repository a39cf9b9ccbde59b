"""Running a training job inside the webui: checks, the run itself, and publishing what it saves.

Used by the tab and by the API. The caller holds the host's GPU queue lock; the host-specific
calls are all in ``a1111``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .. import events
from ..checkpoints import list_states, saved_config
from ..config import TrainConfig
from ..data import prepare_data
from ..engine import embedding_of
from ..errors import TIError, shown
from ..formats.embeddings import save_embedding
from ..runfolder import check_run
from ..templates import is_builtin_template
from ..trainer import train
from . import a1111
from .jobs import Job

_lock = threading.Lock()
JOBS: dict[str, Job] = {}  # run_id -> job, oldest first
MAX_JOBS_KEPT = 20


# ---------------------------------------------------------------------- checks before any work
def request_config(given: dict, *, resume: bool) -> TrainConfig:
    """The config a request asks for: its keys over the defaults, or, to resume, over the run's own config.

    A resumed run keeps its settings: given keys may change only what ``TrainConfig.resumed`` allows.
    """
    if not resume:
        return TrainConfig.from_dict(given)
    where = TrainConfig.from_dict({k: given[k] for k in ("name", "output_dir") if k in given})
    run_dir = _run_folder(where.output_dir or where.name)
    if not list_states(run_dir, where.name):
        raise TIError(f"nothing to resume: {str(run_dir)!r} holds no checkpoint of {where.name!r}; "
                      "press Train to start a new run")
    placed = {**given, "output_dir": str(run_dir)}
    if given.get("init_from"):
        placed["init_from"] = _init_file(given["init_from"])
    return saved_config(run_dir, where.name).resumed(placed)[0]


def resolve(cfg: TrainConfig, *, resume: bool, confined: bool = True) -> TrainConfig:
    """Validate a request against the host's folders; returns the config with its run folder filled in.

    Nothing may be written outside the embeddings and output folders, so ``output_dir`` is a
    relative folder under the output root, and ``init_from`` names a loaded embedding or a file.
    ``confined`` (every API request; the tab when others can reach it, ``a1111.ui_exposed``): what the
    run reads (data_dir, a template file, init_from) must lie inside ``read_roots()``, checked before
    whether it exists, so that a refusal tells nothing about files outside.
    """
    if cfg.model:
        raise TIError(f"config model={shown(cfg.model)} is invalid here: the webui trains on the checkpoint it has "
                      "loaded; leave model empty and pick the checkpoint at the top of the page")
    if cfg.is_pivotal and cfg.gradient_checkpointing:
        # ldm's checkpointing (reentrant) drops the gradients of blocks whose inputs need none, and sgm's own
        # CheckpointFunction computes gradients only for a block's inputs and own parameters: not the adapters'.
        raise TIError("config gradient_checkpointing=True is invalid with mode pivotal in the webui: the host's "
                      "checkpointing would not pass the LoRA's gradients; turn it off (headless runs can use it)")
    cfg = cfg.replace(output_dir=str(_run_folder(cfg.output_dir or cfg.name)),
                      init_from=_init_file(cfg.init_from, confined=confined))
    if confined:
        check_readable(cfg)
    if not cfg.data_dir or not Path(cfg.data_dir).is_dir():
        raise TIError(f"config data_dir={shown(cfg.data_dir)} is invalid: give an existing folder of training images")
    if resume:
        if not list_states(cfg.run_dir, cfg.name):
            raise TIError(f"nothing to resume: {str(cfg.run_dir)!r} holds no checkpoint of {cfg.name!r}; "
                          "press Train to start a new run")
    elif not cfg.overwrite:
        _refuse_existing(cfg)
    check_run(cfg, resume=resume)  # the run folder: not in use by another run, nothing replaced unasked
    return cfg


def read_roots() -> list[Path]:
    """The folders a confined request may read from: the webui's data folder, its embeddings and template
    folders, the output root, and the folders --ti-trainer-allowed-roots and the allowed-roots setting add."""
    roots = [a1111.data_folder(), a1111.embeddings_dir(), a1111.templates_dir(), a1111.output_root(),
             *a1111.extra_read_roots()]
    return list(dict.fromkeys(root.expanduser().resolve() for root in roots))


def check_readable(cfg: TrainConfig) -> None:
    """Every file or folder ``cfg`` reads lies inside ``read_roots()`` (a built-in template set reads none)."""
    if cfg.data_dir:
        readable("config data_dir", cfg.data_dir)
    if not is_builtin_template(cfg.template):
        readable("config template", cfg.template)
    if cfg.init_from and not a1111.loaded_embedding_file(cfg.init_from):
        readable("config init_from", cfg.init_from)


def readable(field: str, value: str) -> Path:
    """``value`` resolved, when it lies inside ``read_roots()``; else a TIError naming the allowed folders."""
    path = Path(value).expanduser().resolve()  # links resolved: a link inside pointing outside is outside
    roots = read_roots()
    if not any(path.is_relative_to(root) for root in roots):
        raise TIError(f"{field}={shown(value)} is invalid: requests may read only inside the webui's data "
                      f"folder and the allowed folders ({', '.join(map(str, roots))}); move it there, or add its "
                      "folder in Settings > TI Trainer (extra allowed folders) or with --ti-trainer-allowed-roots")
    return path


def _run_folder(value: str) -> Path:
    """A run folder under the output root: a relative name, or a path already inside the root (a saved run's)."""
    root = a1111.output_root()
    path = Path(value)
    if path.is_absolute() and path.resolve().is_relative_to(root.resolve()) and path.resolve() != root.resolve():
        return path
    folder = root / _relative("output_dir", value)
    if not folder.resolve().is_relative_to(root.resolve()):  # a link inside the root pointing elsewhere
        raise TIError(f"config output_dir={shown(value)} is invalid: it leads out of the extension's output folder "
                      f"({root}) through a link; give another folder name")
    return folder


def _relative(field: str, value: str) -> Path:
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise TIError(f"config {field}={shown(value)} is invalid: give a folder name relative to the extension's "
                      f"output folder ({a1111.output_root()}); absolute paths and '..' are not allowed")
    return path


def _init_file(init_from: str, *, confined: bool = True) -> str:
    if not init_from:
        return ""
    loaded = a1111.loaded_embedding_file(init_from)
    if loaded:
        return loaded
    path = readable("config init_from", init_from) if confined else Path(init_from).expanduser().resolve()
    if not path.is_file():
        raise TIError(f"config init_from={shown(init_from)} is invalid: give the name of a loaded embedding, or an "
                      "embedding file")
    return str(path)


def _refuse_existing(cfg: TrainConfig) -> None:
    if cfg.is_pivotal and final_lora_target(cfg).exists():
        raise TIError(f"a LoRA named {cfg.name!r} already exists ({final_lora_target(cfg)}): choose another name, "
                      "resume its run, or tick Overwrite")
    target = final_target(cfg)
    existing = target if target.exists() else a1111.loaded_embedding_file(cfg.name)
    if existing and cfg.init_from and Path(cfg.init_from).resolve() == Path(existing).resolve():
        existing = None  # continuing an embedding in place, as the webui's own trainer does
    if existing or list_states(cfg.run_dir, cfg.name):
        where = existing or cfg.run_dir
        raise TIError(f"an embedding named {cfg.name!r} already exists ({where}): choose another name, "
                      "resume its run, or tick Overwrite")


def final_target(cfg: TrainConfig) -> Path:
    return a1111.embeddings_dir() / f"{cfg.name}.{cfg.save_format}"


def final_lora_target(cfg: TrainConfig) -> Path:
    """A pivotal run's LoRA in the host's Lora folder, named like the embedding: ``<lora:name:1>`` plus ``name``."""
    return a1111.lora_dir() / f"{cfg.name}.safetensors"


def checkpoint_folder(cfg: TrainConfig) -> Path:
    sub = Path(a1111.checkpoint_subdir())
    if sub.is_absolute() or ".." in sub.parts:
        raise TIError(f"setting checkpoint_subdir={shown(str(sub))} is invalid: give a folder name inside the "
                      "embeddings folder (Settings > TI Trainer)")
    return a1111.embeddings_dir() / sub / cfg.name


def create_embedding(cfg: TrainConfig) -> Path:
    """A new embedding at step 0 from the init text, in the embeddings folder and usable at once
    (the host's own Create fails on SDXL; this works on every family the engine supports)."""
    target = final_target(cfg)
    existing = target if target.exists() else a1111.loaded_embedding_file(cfg.name)
    if existing and not cfg.overwrite:
        raise TIError(f"an embedding named {cfg.name!r} already exists ({existing}): choose another name or "
                      "tick Overwrite")
    engine = a1111.current_engine()
    emb = embedding_of(engine, cfg.name, engine.init_vectors(cfg.init_text, cfg.num_vectors), 0)
    save_embedding(emb, target, overwrite=cfg.overwrite)
    a1111.register_file(target)
    return target


# ---------------------------------------------------------------------- jobs
def new_job(cfg: TrainConfig) -> Job:
    with _lock:
        running = next((j for j in JOBS.values() if j.active), None)
        if running is not None:
            raise TIError(f"a training run is already active ({running.name}, {running.run_id}): stop it first")
        run_id = base = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while run_id in JOBS:  # a resume right after a stop can start within the same second
            run_id = f"{base}-{sum(k.startswith(base) for k in JOBS) + 1}"
        job = Job(run_id=run_id, name=cfg.name)
        JOBS[job.run_id] = job
        for old in list(JOBS)[:-MAX_JOBS_KEPT]:
            JOBS.pop(old)
        return job


def current_job() -> Job | None:
    with _lock:
        return next((j for j in reversed(JOBS.values()) if j.active), None)


def run(job: Job, cfg: TrainConfig, *, resume: bool) -> Job:
    """Train on the loaded checkpoint; the job records the outcome (a failure too, with its real error)."""
    try:
        engine = a1111.current_engine()
        data = prepare_data(cfg)  # every data problem is reported before the model is touched
        publisher = _Publisher(job, cfg)
        with a1111.host_session(engine, cfg.name):
            result = train(engine, cfg, data=data, resume=resume, on_event=publisher.handle,
                           should_stop=lambda: job.should_stop() or a1111.host_interrupted())
        publisher.publish_final()  # after the session: the live embedding is unregistered by then
        job.finish(stopped=result.stopped_early)
    except Exception as exc:  # the tab and the API show it; "finished" with nothing done is never reported
        job.fail(exc)
    except BaseException as exc:
        job.fail(exc)
        raise
    return job


class _Publisher:
    """Mirrors each saved checkpoint into the host's embeddings folder and keeps the host's progress current."""

    def __init__(self, job: Job, cfg: TrainConfig) -> None:
        self.job, self.cfg = job, cfg
        self.final: Path | None = None
        self.final_lora: Path | None = None

    def handle(self, event: object) -> None:
        self.job.handle(event)
        if isinstance(event, events.Started):
            a1111.progress_begin(event.total_steps, event.start_step)
        elif isinstance(event, events.Step):
            a1111.progress_step(event.step, self.job.summary_html())
        elif isinstance(event, events.Preview):
            a1111.progress_image(event.image)
        elif isinstance(event, events.Saved):
            if event.is_final:
                self.final = Path(event.path)
                self.final_lora = Path(event.lora) if event.lora is not None else None
            if event.checkpoint is not None:  # the last step is a checkpoint like the others, final or not
                self._publish_checkpoint(Path(event.checkpoint))

    def _publish_checkpoint(self, path: Path) -> None:
        folder = checkpoint_folder(self.cfg)
        self.job.published.append(a1111.publish(path, folder / path.name))
        kept = {p.name for p in (self.cfg.run_dir / "checkpoints").glob(f"{self.cfg.name}-*.{self.cfg.save_format}")}
        for copy in folder.glob(f"{self.cfg.name}-*.{self.cfg.save_format}"):
            if copy.name not in kept:  # pruned by keep_last in the run folder: prune the copy too
                a1111.unregister(copy.stem)
                a1111.remove_file(copy)

    def publish_final(self) -> None:
        if self.final is not None:
            self.job.published.append(a1111.publish(self.final, final_target(self.cfg)))
            self.job.final_path = final_target(self.cfg)
        if self.final_lora is not None:
            self.job.published.append(a1111.publish_lora(self.final_lora, final_lora_target(self.cfg)))
