"""Running a training job inside the webui: checks, the run itself, and publishing what it saves.

Used by the tab and by the API. The caller holds the host's GPU queue lock; the model-specific
calls go to the running webui's ``Host`` (``registry.current_host``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
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
from . import folders, gpu_queue, registry
from .host import Host
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
    ``confined`` (every API request; the tab when others can reach it, ``folders.ui_exposed``): what the
    run reads (data_dir, a template file, init_from) must lie inside ``read_roots()``, checked before
    whether it exists, so that a refusal tells nothing about files outside.
    """
    host = registry.current_host()
    if host.reason:  # a webui no adapter serves: its one sentence, before anything else is checked
        raise TIError(host.reason)
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
    roots = [folders.data_folder(), folders.embeddings_dir(), folders.templates_dir(), folders.output_root(),
             *folders.extra_read_roots()]
    return list(dict.fromkeys(root.expanduser().resolve() for root in roots))


def check_readable(cfg: TrainConfig) -> None:
    """Every file or folder ``cfg`` reads lies inside ``read_roots()`` (a built-in template set reads none)."""
    if cfg.data_dir:
        readable("config data_dir", cfg.data_dir)
    if not is_builtin_template(cfg.template):
        readable("config template", cfg.template)
    if cfg.init_from and not loaded_embedding_file(cfg.init_from):
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


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """The run folder ``cfg`` names, under the output root."""
    return _run_folder(cfg.output_dir or cfg.name)


def _run_folder(value: str) -> Path:
    """A run folder under the output root: a relative name, or a path already inside the root (a saved run's)."""
    root = folders.output_root()
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
                      f"output folder ({folders.output_root()}); absolute paths and '..' are not allowed")
    return path


def _init_file(init_from: str, *, confined: bool = True) -> str:
    if not init_from:
        return ""
    loaded = loaded_embedding_file(init_from)
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
    existing = target if target.exists() else loaded_embedding_file(cfg.name)
    if existing and cfg.init_from and Path(cfg.init_from).resolve() == Path(existing).resolve():
        existing = None  # continuing an embedding in place, as the webui's own trainer does
    if existing or list_states(cfg.run_dir, cfg.name):
        where = existing or cfg.run_dir
        raise TIError(f"an embedding named {cfg.name!r} already exists ({where}): choose another name, "
                      "resume its run, or tick Overwrite")


def final_target(cfg: TrainConfig) -> Path:
    return folders.embeddings_dir() / f"{cfg.name}.{cfg.save_format}"


def final_lora_target(cfg: TrainConfig) -> Path:
    """A pivotal run's LoRA in the host's Lora folder, named like the embedding: ``<lora:name:1>`` plus ``name``."""
    return folders.lora_dir() / f"{cfg.name}.safetensors"


def checkpoint_folder(cfg: TrainConfig) -> Path:
    sub = Path(folders.checkpoint_subdir())
    if sub.is_absolute() or ".." in sub.parts:
        raise TIError(f"setting checkpoint_subdir={shown(str(sub))} is invalid: give a folder name inside the "
                      "embeddings folder (Settings > TI Trainer)")
    return folders.embeddings_dir() / sub / cfg.name


def create_embedding(cfg: TrainConfig) -> Path:
    """A new embedding at step 0 from the init text, in the embeddings folder and usable at once
    (the host's own Create fails on SDXL; this works on every family the engine supports)."""
    target = final_target(cfg)
    existing = target if target.exists() else loaded_embedding_file(cfg.name)
    if existing and not cfg.overwrite:
        raise TIError(f"an embedding named {cfg.name!r} already exists ({existing}): choose another name or "
                      "tick Overwrite")
    host = registry.current_host()
    engine = host.engine()
    emb = embedding_of(engine, cfg.name, engine.init_vectors(cfg.init_text, cfg.num_vectors), 0)
    save_embedding(emb, target, overwrite=cfg.overwrite)
    host.register_file(target)
    return target


def loaded_embedding_file(name: str) -> str | None:
    """The file of an embedding the host has loaded under ``name`` (None: no such embedding, or no file)."""
    return registry.current_host().loaded_embeddings().get(name)


# ---------------------------------------------------------------------- jobs
def refuse_if_active() -> None:
    """One run at a time, refused at once (never queued to start later by itself), naming the active run."""
    running = current_job()
    if running is not None:
        raise TIError(f"a training run is already active: {running.name} ({running.run_id}, step {running.step} of "
                      f"{running.total_steps or '?'}); stop it first, or wait for it to end")


def new_job(cfg: TrainConfig, task_id: str = "") -> Job:
    with _lock:
        running = next((j for j in JOBS.values() if j.active), None)
        if running is not None:
            raise TIError(f"a training run is already active: {running.name} ({running.run_id}, step "
                          f"{running.step} of {running.total_steps or '?'}); stop it first, or wait for it to end")
        run_id = base = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while run_id in JOBS:  # a resume right after a stop can start within the same second
            run_id = f"{base}-{sum(k.startswith(base) for k in JOBS) + 1}"
        job = Job(run_id=run_id, name=cfg.name, task_id=task_id or f"task(ti-trainer-{run_id})",
                  settings=cfg.to_dict())
        JOBS[job.run_id] = job
        for old in list(JOBS)[:-MAX_JOBS_KEPT]:
            JOBS.pop(old)
        return job


def current_job() -> Job | None:
    with _lock:
        return next((j for j in reversed(JOBS.values()) if j.active), None)


def latest_job() -> Job | None:
    """The active run, else the last one of this session: what the tab's run panel shows."""
    with _lock:
        jobs = list(JOBS.values())
    return next((j for j in reversed(jobs) if j.active), jobs[-1] if jobs else None)


def start(job: Job, cfg: TrainConfig, *, resume: bool) -> threading.Thread:
    """Run the job in a thread of its own, holding the host's GPU queue lock under the job's task id: the run
    outlives the request (and the page) that started it, and the host's progress API follows the task id."""
    def work() -> None:
        with gpu_queue.gpu_job(job.task_id):
            run(job, cfg, resume=resume)

    thread = threading.Thread(target=work, name=f"ti-trainer {job.run_id}", daemon=True)
    thread.start()
    return thread


def run(job: Job, cfg: TrainConfig, *, resume: bool) -> Job:
    """Train on the loaded checkpoint; the job records the outcome (a failure too, with its real error)."""
    try:
        host = registry.current_host()
        engine = host.engine()
        data = prepare_data(cfg)  # every data problem is reported before the model is touched
        publisher = _Publisher(job, cfg, host)
        with host.session(engine, cfg.name), _host_eta(job):
            result = train(engine, cfg, data=data, resume=resume, on_event=publisher.handle,
                           should_stop=lambda: job.should_stop() or gpu_queue.host_interrupted())
        publisher.publish_final()  # after the session: the live embedding is unregistered by then
        job.finish(stopped=result.stopped_early)
    except Exception as exc:  # the tab and the API show it; "finished" with nothing done is never reported
        job.fail(exc)
    except BaseException as exc:
        job.fail(exc)
        raise
    finally:
        gpu_queue.progress_end()
    return job


@contextlib.contextmanager
def _host_eta(job: Job, every_s: float = 0.5) -> Iterator[None]:
    """Keeps the host's progress bar ETA on the run's own (``Job.eta_s``) while the run trains: the host
    extrapolates between our updates, and during a preview its ETA would grow by (1 - p) / p times the
    preview's length."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            gpu_queue.progress_eta(job.eta_s)

    thread = threading.Thread(target=tick, name=f"ti-trainer eta {job.run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class _Publisher:
    """Mirrors each saved checkpoint into the host's embeddings folder and keeps the host's progress current.

    Every published checkpoint copy stays while its file exists: the host matches embedding names by their
    leading tokens, so once ``tok-150`` were gone, typing it would silently use ``tok`` with "-150" as plain
    text. keep_last prunes only the run folder's checkpoint states (with optimizer state, the large files);
    the copies are a few KB each. Each copy gets its step's preview beside it (``<name>.preview.png``, the
    host's card preview convention), the final embedding the run's last preview.
    """

    def __init__(self, job: Job, cfg: TrainConfig, host: Host) -> None:
        self.job, self.cfg, self.host = job, cfg, host
        self.final: Path | None = None
        self.final_lora: Path | None = None
        self.copies: dict[int, Path] = {}  # step -> the checkpoint's copy in the embeddings folder

    def handle(self, event: object) -> None:
        self.job.handle(event)
        if isinstance(event, events.Started):
            gpu_queue.progress_begin(event.total_steps, event.start_step, self.cfg.name)
        elif isinstance(event, events.Step):
            gpu_queue.progress_step(event.step, event.total_steps, self.cfg.name)
            gpu_queue.progress_eta(self.job.eta_s)
        elif isinstance(event, events.Preview):
            gpu_queue.progress_image(event.image)
            if event.step in self.copies:
                self._card_preview(Path(event.path), self.copies[event.step])
        elif isinstance(event, events.Saved):
            if event.is_final:
                self.final = Path(event.path)
                self.final_lora = Path(event.lora) if event.lora is not None else None
            if event.checkpoint is not None:  # the last step is a checkpoint like the others, final or not
                self._publish_checkpoint(event.step, Path(event.checkpoint), event.is_final)

    def _publish_checkpoint(self, step: int, path: Path, is_final: bool) -> None:
        copy = folders.publish(self.host, path, checkpoint_folder(self.cfg) / path.name)
        self.job.published.append(copy)
        self.copies[step] = copy
        preview = self.job.previews[-1] if self.job.previews else None
        # The last step's checkpoint holds the final embedding's vectors: it shows the final embedding's card
        # preview (the run's last one) when a stop ended the run between previews.
        if preview is not None and (preview[0] == step or is_final):
            self._card_preview(preview[1], copy)

    def _card_preview(self, image: Path, embedding: Path) -> None:
        if image.is_file():
            folders.copy_file(image, card_preview_path(embedding))

    def publish_final(self) -> None:
        if self.final is not None:
            target = final_target(self.cfg)
            self.job.published.append(folders.publish(self.host, self.final, target))
            self.job.final_path = target
            if self.job.previews:
                self._card_preview(self.job.previews[-1][1], target)
        if self.final_lora is not None:
            self.job.lora_path = folders.publish_lora(self.final_lora, final_lora_target(self.cfg))
            self.job.published.append(self.job.lora_path)


def card_preview_path(embedding: Path) -> Path:
    """Where the host's cards look for an embedding's preview: an image of the same name beside the file
    (``.preview.png``: the host's loader skips those, where a plain .png could be read as an embedding)."""
    return embedding.with_name(f"{embedding.stem}.preview.png")


# ---------------------------------------------------------------------- run folders on disk
def runs_on_disk() -> list[dict]:
    """The run folders under the output root (one or two levels down), with their checkpoint steps."""
    root = folders.output_root()
    out = []
    for config_file in sorted([*root.glob("*/config.yaml"), *root.glob("*/*/config.yaml")]):
        try:
            cfg = TrainConfig.load(config_file)
        except TIError:
            continue  # a folder someone edited by hand: not ours to list
        steps = [step for step, _ in list_states(config_file.parent, cfg.name)]
        out.append({"name": cfg.name, "run_dir": str(config_file.parent), "checkpoint_steps": steps,
                    "steps": cfg.steps, "output_dir": config_file.parent.relative_to(root).as_posix()})
    return out


def load_run(output_dir: str) -> TrainConfig:
    """A run folder's config.yaml (a folder under the output root, as ``runs_on_disk`` lists it)."""
    if not output_dir:
        raise TIError("choose a run folder to load (the list shows the runs in the output folder)")
    folder = _run_folder(output_dir)
    if not (folder / "config.yaml").is_file():
        raise TIError(f"run folder {str(folder)!r} holds no config.yaml: it is not a training run")
    return TrainConfig.load(folder / "config.yaml")


def resume_differences(form: TrainConfig) -> tuple[TrainConfig, TrainConfig, list[tuple[str, object, object]]]:
    """The run's saved config, the form placed as a run (its folder and init_from resolved), and each setting of
    the form that differs from the run's but may not change on resume (name, the run's value, the form's)."""
    run_dir = _run_folder(form.output_dir or form.name)
    if not list_states(run_dir, form.name):
        raise TIError(f"nothing to resume: {str(run_dir)!r} holds no checkpoint of {form.name!r}; "
                      "press Train to start a new run")
    saved = saved_config(run_dir, form.name)
    placed = form.replace(output_dir=str(run_dir), init_from=_init_file(form.init_from, confined=False)
                          if form.init_from else "", model=saved.model)
    return saved, placed, [(name, getattr(saved, name), getattr(placed, name)) for name in saved.differences(placed)]
