"""The training loop.

The embedding's vectors train: they are float32 leaf tensors owned here, spliced into the prompt by
the engine; every model weight stays frozen. In pivotal mode LoRA adapters (``lora.Adapters``, float32
leaf tensors too, hooked onto the model's layers for the run) train with them, in a second parameter
group with its own schedule, and the vectors stop after ``ti_fraction`` of the steps. Each optimizer
step draws its batch, noise, timesteps and dropout from generators seeded by (seed, step), so a resumed
run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import operator
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import events
from .checkpoints import (
    TrainingState,
    checkpoint_path,
    final_lora_path,
    list_states,
    load_latest,
    remove_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import TrainingData, prepare_data
from .devices import autocast_dtype
from .embedding import match_to_model
from .engine import (
    MAX_NORM_FACTOR,
    TRAINER,
    Engine,
    PreviewRequest,
    add_noise,
    embedding_of,
    min_snr_weights,
    training_target,
    vector_problem,
)
from .errors import TIError, WriteError
from .fileio import atomic_path
from .formats.embeddings import load_embedding, save_embedding
from .formats.lora import kohya_metadata, save_lora
from .halves import held_in_bf16
from .latents import LatentCache
from .layouts import channels_last_convs, contiguous_conv_inputs, native_small_convs
from .lora import Adapters
from .losslog import LossLog
from .profiling import StepProfiler
from .runfolder import RunLock, check_new_run, check_run, sweep
from .schedule import parse_schedule

MAX_BAD_STEPS = 20  # consecutive non-finite steps before giving up


EventHandler = Callable[[object], None]


class Diverged(TIError):
    """The vectors are no longer fit to save (non-finite, or implausibly long), or steps keep failing."""


def train(engine: Engine, cfg: TrainConfig, *, data: TrainingData | None = None, resume: bool = False,
          on_event: EventHandler | None = None, should_stop: Callable[[], bool] = lambda: False) -> events.Result:
    """Train ``cfg.name`` on ``engine``; report through ``on_event``; stop cleanly when ``should_stop()``.

    The run folder is locked for the whole run, and swept of what interrupted runs left there first.
    """
    emit = on_event or (lambda _event: None)
    t_start = time.perf_counter()
    precision = autocast_dtype(cfg.precision, engine.device)  # a dtype the device cannot do is refused first
    check_run(cfg, resume=resume)
    data = data or prepare_data(cfg)
    with RunLock(cfg.run_dir):
        sweep(cfg.run_dir, cfg.name)
        with engine.frozen(), held_weights(engine, precision) as held, conv_layout(engine, precision):
            engine.set_gradient_checkpointing(cfg.gradient_checkpointing)
            run = _Run.resume(engine, cfg, data, emit) if resume else _Run.start(engine, cfg, data, emit)
            notes = [*data.notes, *run.notes, *compute_notes(engine, held)]
            emit(events.Started(run.step, run.total, data.num_images, len(data.samples), notes,
                                time.perf_counter() - t_start))
            with run.adapters_attached():
                reason = run.loop_keeping_progress(should_stop)
        final_path = run.save_final()
    result = events.Result(run.step, final_path, run.log.last_loss, reason != "done", run.describe(reason),
                           run.skipped, run.final_lora)
    emit(result)
    return result


@contextlib.contextmanager
def held_weights(engine: Engine, precision: torch.dtype) -> Iterator[int]:
    """A bf16 run holds the step's frozen weights in bfloat16 (the matmul and conv layers; weights loaded
    as bf16 stay as they are), so that autocast has nothing to re-cast each step; they are restored bit for
    bit afterwards, which matters in the webui, whose model the run borrows. Yields how many it converted."""
    if precision != torch.bfloat16:
        yield 0
        return
    with held_in_bf16(engine.step_modules()) as count:
        yield count


@contextlib.contextmanager
def conv_layout(engine: Engine, precision: torch.dtype) -> Iterator[None]:
    """On a CPU a float32 run holds the step's convolutions channels-last, a bf16 run keeps them NCHW with
    NCHW inputs: the faster layout of each there (``layouts``), and in the webui either avoids a weight
    reorder per conv pass; the convs at the smallest latents run torch's im2col kernel. Elsewhere the
    layout is left as loaded."""
    if engine.device.type != "cpu":
        yield
        return
    layout = (channels_last_convs if precision == torch.float32 and engine.cpu_channels_last
              else contiguous_conv_inputs)
    with layout(engine.step_modules()), native_small_convs(engine.step_modules()):
        yield


def compute_notes(engine: Engine, held: int) -> list[str]:
    """What the run computes with, for the run panel: the CPU threads (the speed depends on them), the weights
    a bf16 run converted."""
    threads = torch.get_num_threads()
    notes = ([f"computing on the CPU with {threads} thread{'s' if threads != 1 else ''}"]
             if engine.device.type == "cpu" else [])
    if held:
        notes.append(f"precision bf16: {held} weight tensors held in bfloat16 for the run (restored bit for bit "
                     "after)")
    return notes


@dataclass
class Batch:
    latents: torch.Tensor
    captions: list[str]
    weights: torch.Tensor | None


class _Run:
    """The state of one training run, and the steps that change it. Built by ``start`` or ``resume``."""

    def __init__(self, engine: Engine, cfg: TrainConfig, data: TrainingData, emit: EventHandler, *, step: int,
                 vectors: dict[str, torch.Tensor], trained: list[str], adapters: Adapters | None,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, log: LossLog, latents: LatentCache,
                 notes: list[str]) -> None:
        self.engine, self.cfg, self.data, self.emit = engine, cfg, data, emit
        self.lr_schedule = parse_schedule(cfg.learning_rate)
        self.lora_schedule = parse_schedule(cfg.lora_learning_rate, what="LoRA learning rate")
        self.clip_schedule = parse_schedule(cfg.clip_value, what="clip value")
        self.total = self.lr_schedule.planned_steps(cfg.steps)
        self.ti_stop = ti_stop_step(cfg, self.total)
        self.precision = autocast_dtype(cfg.precision, engine.device)
        self.run_dir = cfg.run_dir
        self.start_step = self.step = step
        self.vectors, self.trained = vectors, trained  # every encoder's vectors; the keys of the trained ones
        self.adapters = adapters
        self.params = [vectors[k] for k in trained] + (adapters.parameters() if adapters else [])
        self.optimizer, self.scaler, self.log, self.latents = optimizer, scaler, log, latents
        self.notes = notes
        self.skipped = self.bad_streak = 0
        self.final_lora: Path | None = None

    # ------------------------------------------------------------------ the two ways a run begins
    @classmethod
    def start(cls, engine: Engine, cfg: TrainConfig, data: TrainingData, emit: EventHandler) -> _Run:
        """A new run: the run folder must hold no checkpoint or embedding of this name unless ``overwrite``."""
        vectors, notes = _initial_vectors(engine, cfg)
        _clear_old_run(cfg)
        return cls._build(engine, cfg, data, emit, step=0, vectors=vectors, notes=notes, state=None)

    @classmethod
    def resume(cls, engine: Engine, cfg: TrainConfig, data: TrainingData, emit: EventHandler) -> _Run:
        """The run in ``cfg.run_dir`` from its last checkpoint: vectors, optimizer, scaler and pending losses."""
        state = load_latest(cfg.run_dir, cfg.name)
        _check_resumable(state, engine)
        # Only what may change on resume may differ from the run's own settings (TrainConfig.resumed).
        _, changes = TrainConfig.from_dict(state.config).resumed(cfg.to_dict())
        notes = [f"resumed with {change}" for change in changes]
        return cls._build(engine, cfg, data, emit, step=state.step, vectors=state.vectors, notes=notes, state=state)

    @classmethod
    def _build(cls, engine: Engine, cfg: TrainConfig, data: TrainingData, emit: EventHandler, *, step: int,
               vectors: dict[str, torch.Tensor], notes: list[str], state: TrainingState | None) -> _Run:
        lr_schedule = parse_schedule(cfg.learning_rate)
        total = lr_schedule.planned_steps(cfg.steps)
        notes = [n for n in [lr_schedule.describe_end(cfg.steps)] if n] + notes
        # The vectors are float32 leaf tensors of our own, whatever the model's dtype.
        vectors = {k: v.detach().to(engine.device, torch.float32).clone() for k, v in vectors.items()}
        trained = [k for k in vectors if k in (cfg.train_encoders or list(vectors))]
        if not trained:
            raise TIError(f"train_encoders {cfg.train_encoders} names none of this model's encoders {list(vectors)}")
        for k in trained:
            vectors[k].requires_grad_(True)
        adapters = make_adapters(engine, cfg, state) if cfg.is_pivotal else None
        groups = [{"params": [vectors[k] for k in trained], "lr": lr_schedule.value_at(step)}]
        if adapters is not None:
            lora_lr = parse_schedule(cfg.lora_learning_rate).value_at(step)
            groups.append({"params": adapters.parameters(), "lr": lora_lr})
            notes.append(f"pivotal tuning: LoRA rank {cfg.lora_rank} on {len(adapters.names)} layers "
                         f"({', '.join(cfg.lora_targets)}); the embedding trains for the first "
                         f"{ti_stop_step(cfg, total)} of {total} steps")
        optimizer = make_optimizer(cfg, groups)
        scaler = torch.amp.GradScaler(engine.device.type,
                                      enabled=autocast_dtype(cfg.precision, engine.device) == torch.float16)
        log = LossLog(cfg.run_dir / "loss.csv", truncate_after=step)
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            if state.scaler:
                scaler.load_state_dict(state.scaler)
            log.restore_pending(state.pending_losses)
        cfg.save(cfg.run_dir / "config.yaml")
        if step >= total:
            notes.append(f"the checkpoint is already at step {step} of {total}: nothing to train")
        latents = LatentCache.build(engine, data.samples, cfg, cfg.run_dir)
        return cls(engine, cfg, data, emit, step=step, vectors=vectors, trained=trained, adapters=adapters,
                   optimizer=optimizer, scaler=scaler, log=log, latents=latents, notes=notes)

    # ------------------------------------------------------------------ the loop
    @contextlib.contextmanager
    def adapters_attached(self) -> Iterator[None]:
        """The LoRA adapters hooked onto the model for the loop (previews included); none left after."""
        if self.adapters is None:
            yield
            return
        with self.adapters.attached():
            yield

    def loop_keeping_progress(self, should_stop: Callable[[], bool]) -> str:
        """``loop``; after a failure the steps done are saved (if the vectors are fit to) before it is raised."""
        try:
            return self.loop(should_stop)
        except WriteError:
            raise  # saving again would fail the same way
        except Diverged as exc:
            self.save_after_error()
            raise self.diverged(exc) from None
        except Exception:
            self.save_after_error()
            raise

    def loop(self, should_stop: Callable[[], bool]) -> str:
        timer = _Timer(self.cfg.batch_size * self.cfg.grad_accum)
        profiler = StepProfiler(self.run_dir, self.engine.step_modules())
        while self.step < self.total:
            if should_stop():
                return "stopped"
            profiler.before(self.step + 1)
            lr = self.set_rates()
            loss = functools.reduce(operator.add, [self.backward(micro) for micro in range(self.cfg.grad_accum)])
            self.optimizer_step(loss)
            self.step += 1
            profiler.after(self.step)
            timer.tick()
            self.report(loss, lr, timer)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total:
                timer.pause(lambda: self.save(is_final=False))
            if self.cfg.preview_every and self.step % self.cfg.preview_every == 0:
                timer.pause(self.preview)
        return "done"

    def set_rates(self) -> float:
        """This step's learning rates; after ``ti_stop`` the vectors are frozen (no gradient through the text
        encoder unless it has adapters). Returns the embedding's rate."""
        lr = self.lr_schedule.value_at(self.step)
        embedding_on = self.step < self.ti_stop
        for key in self.trained:
            self.vectors[key].requires_grad_(embedding_on)
        groups = self.optimizer.param_groups
        groups[0]["lr"] = lr if embedding_on else 0.0
        if self.adapters is not None:
            groups[1]["lr"] = self.lora_schedule.value_at(self.step)
        return lr

    def backward(self, micro: int) -> torch.Tensor:
        """One micro-batch: forward, loss (float32), scaled backward. Returns the detached loss."""
        batch = self.draw_batch(micro)
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.step, micro, "noise"))
        with self.dropout_rng(micro):
            first_sample = (self.step * self.cfg.grad_accum + micro) * self.cfg.batch_size
            loss = batch_loss(self.engine, self.cfg, batch, self.vectors, generator, self.precision, first_sample)
            loss = loss / self.cfg.grad_accum
            self.scaler.scale(loss).backward()
        return loss.detach()

    @contextlib.contextmanager
    def dropout_rng(self, micro: int) -> Iterator[None]:
        """LoRA dropout draws from the global RNG (so that checkpointing replays it): seeded per micro-batch,
        and put back afterwards, so that a resumed run drops the same inputs and nothing else sees a change."""
        if self.adapters is None or not self.adapters.dropout:
            yield
            return
        device = self.engine.device
        forked: list[int] | None = [] if device.type == "cpu" else None  # None: every device of the type
        with torch.random.fork_rng(devices=forked, device_type=device.type if device.type != "cpu" else "cuda"):
            torch.manual_seed(step_seed(self.cfg.seed, self.step, micro, "dropout"))
            yield

    def draw_batch(self, micro: int) -> Batch:
        indices = self.data.batch_indices(self.step * self.cfg.grad_accum + micro)
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.step, micro, "latent"))
        latents, weights = self.latents.batch(indices, generator)
        rng = random.Random(step_seed(self.cfg.seed, self.step, micro, "caption"))
        captions = [self.data.caption(i, rng) for i in indices]
        return Batch(latents, captions, weights)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Unscale, check for inf/NaN, clip, step. A non-finite step is skipped and reported, never trained on."""
        self.scaler.unscale_(self.optimizer)
        grads_ok = torch.stack([torch.isfinite(p.grad).all() for p in self.params if p.grad is not None]).all()
        vectors_ok = self.vectors_plausible()
        if self.adapters is not None:
            vectors_ok = vectors_ok & self.adapters.finite()
        if not bool(torch.isfinite(loss) & grads_ok & vectors_ok):  # one host sync per step: never train on NaN
            if not bool(vectors_ok):
                raise Diverged(f"training diverged: after step {self.step} {self.weights_problem()}")
            self._skip(loss)
            return
        self.bad_streak = 0
        clip = self.clip_schedule.value_at(self.step)
        if self.cfg.clip_mode == "value":
            torch.nn.utils.clip_grad_value_(self.params, clip)
        elif self.cfg.clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _skip(self, loss: torch.Tensor) -> None:
        self.skipped += 1
        self.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # lowers the fp16 loss scale; a no-op when the scaler is disabled
        self.emit(events.Warning(self.step + 1, f"step {self.step + 1}: loss or gradient is {loss.item()} "
                                 "(not finite); the step was skipped"))
        if self.bad_streak >= MAX_BAD_STEPS:
            raise Diverged(
                f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient (at step {self.step + 1}): "
                "lower the learning rate, use precision bf16 or fp32, or (SDXL) the fp16-fix VAE"
            )

    def vectors_plausible(self) -> torch.Tensor:
        """On the device, no sync: every trained vector is finite and within ``MAX_NORM_FACTOR`` token norms."""
        norms = self.engine.token_norms
        return torch.stack([self.vectors[k].detach().float().norm(dim=1).max() <= MAX_NORM_FACTOR
                            * norms.get(k, math.inf) for k in self.trained]).all()  # NaN compares False

    def weights_problem(self) -> str | None:
        """Why the vectors or the adapters must not be saved (``vector_problem``, a non-finite adapter), or None."""
        problem = vector_problem(self.vectors, self.engine.token_norms)
        return problem or (self.adapters.problem() if self.adapters is not None else None)

    def diverged(self, exc: Diverged) -> Diverged:
        """``exc``, naming the checkpoint the run can go on from."""
        states = list_states(self.run_dir, self.cfg.name)
        if not states:
            return Diverged(f"{exc}. No checkpoint was saved before: start again with a lower learning rate")
        step = states[-1][0]
        where = checkpoint_path(self.run_dir, self.cfg.name, step, self.cfg.save_format)
        return Diverged(f"{exc}. Nothing after step {step} was saved: the last good checkpoint is step {step} "
                        f"({str(where)!r}); resume from it with a lower learning rate (resume may change "
                        "learning_rate), or start again")

    # ------------------------------------------------------------------ outputs
    def report(self, loss: torch.Tensor, lr: float, timer: _Timer) -> None:
        logged = self.log.add(self.step, loss, lr, every=self.cfg.log_every, force=self.step == self.total)
        remaining = self.total - self.step
        self.emit(events.Step(self.step, self.total, logged, lr, timer.images_per_s(), timer.elapsed(),
                              remaining * timer.seconds_per_step()))

    def save(self, is_final: bool) -> Path:
        """Write this step's checkpoint (and with ``is_final`` the final embedding); vectors unfit to save never
        are: nothing is written, counted by keep_last or published, and ``Diverged`` is raised."""
        problem = self.weights_problem()
        if problem:
            raise Diverged(f"training diverged: after step {self.step} {problem}")
        emb = embedding_of(self.engine, self.cfg.name, self.vectors, self.step)
        weights = self.adapters.weights() if self.adapters is not None else None
        state = TrainingState(self.step, emb.vectors, self.optimizer.state_dict(), self.scaler.state_dict()
                              if self.scaler.is_enabled() else None, self.cfg.to_dict(), self.log.pending_values(),
                              TrainingState.lora_payload(weights) if weights is not None else None)
        metadata = lora_metadata(self.engine, self.cfg, self.step)
        checkpoint = save_checkpoint(self.run_dir, emb, state, self.cfg.save_format, self.cfg.keep_last, metadata)
        path, lora = checkpoint, None
        if is_final:
            path = save_embedding(emb, self.run_dir / f"{self.cfg.name}.{self.cfg.save_format}", overwrite=True)
            if weights is not None:
                lora = self.final_lora = save_lora(weights, final_lora_path(self.run_dir, self.cfg.name), metadata,
                                                   overwrite=True)
        self.emit(events.Saved(self.step, path, is_final, checkpoint, lora))
        return path

    def save_final(self) -> Path:
        try:
            return self.save(is_final=True)
        except Diverged as exc:
            raise self.diverged(exc) from None

    def save_after_error(self) -> None:
        """Keep the steps done before a crash (out of memory, a host error): --resume continues from here."""
        if self.step <= self.start_step or self.weights_problem():
            return
        try:
            path = self.save(is_final=False)
        except Exception as exc:  # the original error matters more; say why nothing was saved
            self.emit(events.Warning(self.step, f"could not save after the error: {type(exc).__name__}: {exc}"))
            return
        self.emit(events.Warning(self.step, f"training failed at step {self.step}; progress saved to {path}"))

    def preview(self) -> None:
        request = preview_request(self.cfg, self.data)
        try:
            # Under the run's autocast when the weights are bf16: the host renders with its own dtype otherwise.
            with torch.no_grad(), torch.autocast(self.engine.device.type, dtype=torch.bfloat16,
                                                 enabled=self.precision == torch.bfloat16):
                image = self.engine.render_preview(request, self.cfg.name, self.vectors)
        except Exception as exc:  # a broken preview must not cost the user the training run
            self.emit(events.Warning(self.step, f"preview at step {self.step} failed: {type(exc).__name__}: {exc}"))
            return
        path = self.run_dir / "previews" / f"{self.cfg.name}-{self.step}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        self.emit(events.Preview(self.step, path, image))

    def describe(self, reason: str) -> str:
        if reason == "stopped":
            return f"stopped by request at step {self.step} of {self.total}; saved"
        if self.total < self.cfg.steps:
            return f"finished at step {self.step}: the learning-rate schedule ends there"
        return f"finished at step {self.step}"


# ---------------------------------------------------------------------- setting a run up
def _clear_old_run(cfg: TrainConfig) -> None:
    """Checked again under the run's lock (``check_run`` ran before it); with overwrite, the old run goes."""
    check_new_run(cfg)
    for step, _ in list_states(cfg.run_dir, cfg.name):  # an old run's later checkpoints must not outlive this one's
        remove_checkpoint(cfg.run_dir, cfg.name, step)
    final_lora_path(cfg.run_dir, cfg.name).unlink(missing_ok=True)  # nor its LoRA, made for another embedding


def make_adapters(engine: Engine, cfg: TrainConfig, state: TrainingState | None) -> Adapters:
    """The run's LoRA adapters on the layers ``cfg.lora_targets`` name: the checkpoint's, or new ones."""
    modules = engine.lora_modules(cfg.lora_targets)
    if not modules:
        raise TIError(f"lora_targets {cfg.lora_targets} found no layer to adapt in this model")
    if state is not None:
        weights = state.lora_weights
        if weights is None:
            raise TIError("the checkpoint holds no LoRA: it is of an embedding run; resume it with mode embedding")
        return Adapters(modules, weights, cfg.lora_dropout)
    return Adapters.new(modules, rank=cfg.lora_rank, alpha=cfg.lora_scale_alpha, dropout=cfg.lora_dropout,
                        seed=step_seed(cfg.seed, 0, 0, "lora"))


def ti_stop_step(cfg: TrainConfig, total: int) -> int:
    """The step after which the vectors no longer train: ``ti_fraction`` of the planned steps (pivotal mode)."""
    return max(1, round(cfg.ti_fraction * total)) if cfg.is_pivotal else total


def lora_metadata(engine: Engine, cfg: TrainConfig, step: int) -> dict[str, str]:
    return kohya_metadata(family=engine.family, rank=cfg.lora_rank, alpha=cfg.lora_scale_alpha,
                          dropout=cfg.lora_dropout, targets=list(cfg.lora_targets), name=cfg.name, steps=step,
                          checkpoint_name=engine.checkpoint_name, checkpoint_hash=engine.checkpoint_hash,
                          trainer=TRAINER)


def _initial_vectors(engine: Engine, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The vectors a new run starts from (``init_from``'s, else the init text's), and notes for the user."""
    if not cfg.init_from:
        return engine.init_vectors(cfg.init_text, cfg.num_vectors), []
    emb = match_to_model(load_embedding(cfg.init_from), engine.encoder_widths)
    problem = vector_problem(emb.vectors, engine.token_norms)
    if problem:
        raise TIError(f"init_from {cfg.init_from!r} cannot be trained from: {problem}; use another embedding, or "
                      "init_text")
    notes = []
    if emb.num_vectors != cfg.num_vectors:
        notes.append(f"init_from {cfg.init_from!r} has {emb.num_vectors} vectors per token; using that instead of "
                     f"num_vectors={cfg.num_vectors}")
    return emb.vectors, notes


def _check_resumable(state: TrainingState, engine: Engine) -> None:
    widths = {k: int(v.shape[1]) for k, v in state.vectors.items()}
    if widths != engine.encoder_widths:
        raise TIError(f"the checkpoint was trained with encoders {widths}, the loaded model has "
                      f"{engine.encoder_widths}: resume with the model it was trained on")


# ---------------------------------------------------------------------- small helpers

def batch_loss(engine: Engine, cfg: TrainConfig, batch: Batch, vectors: dict[str, torch.Tensor],
               generator: torch.Generator, precision: torch.dtype, first_sample: int | None = None) -> torch.Tensor:
    """The denoising loss of one batch, in float32; noise (and uniform timesteps) come from ``generator``;
    stratified timesteps from ``first_sample``, the run's index of the batch's first sample (None, as for
    evaluate_loss's fixed draws: uniform)."""
    device = engine.device
    noise = torch.randn(batch.latents.shape, generator=generator)
    count, levels = noise.shape[0], len(engine.alphas_cumprod)
    if cfg.timesteps == "stratified" and first_sample is not None:
        timesteps = stratified_timesteps(levels, first_sample, count, cfg.seed).to(device)
    else:
        timesteps = torch.randint(0, levels, (count,), generator=generator).to(device)
    if cfg.noise_offset:  # one offset per image and channel (Crosslabs' noise offset), drawn after the rest
        noise = noise + cfg.noise_offset * torch.randn(noise.shape[:2] + (1, 1), generator=generator)
    noise = noise.to(device)
    alphas = engine.alphas_cumprod
    with torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32):
        size = (batch.latents.shape[-2] * 8, batch.latents.shape[-1] * 8)  # pixels: the VAE downsamples by 8
        cond = engine.encode_prompts(batch.captions, cfg.name, vectors, size)
        pred = engine.predict(add_noise(alphas, batch.latents, noise, timesteps), timesteps, cond)
    target = training_target(engine.prediction_type, alphas, batch.latents, noise, timesteps)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if batch.weights is not None:
        loss = loss * batch.weights
    loss = loss.mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weights(engine.prediction_type, alphas, timesteps, cfg.min_snr_gamma)
    return loss.mean()


@torch.no_grad()
def evaluate_loss(engine: Engine, cfg: TrainConfig, data: TrainingData, vectors: dict[str, torch.Tensor], *,
                  draws: int = 4, seed: int = 12345) -> float:
    """Mean loss over every sample x ``draws`` fixed (noise, timestep, caption) draws: comparable across vectors."""
    latents = LatentCache.build(engine, data.samples, cfg.replace(cache_latents_to_disk=False), cfg.run_dir)
    total, count = 0.0, len(data.samples)
    for draw in range(draws):
        for indices in latents.size_groups(range(count)):  # one batch per size: buckets cannot be stacked
            mean, weights = latents.batch(indices, torch.Generator().manual_seed(seed + draw))
            rng = random.Random(seed + draw)
            batch = Batch(mean, [data.caption(i, rng) for i in indices], weights)
            generator = torch.Generator().manual_seed(seed + 1000 + draw)
            total += batch_loss(engine, cfg, batch, vectors, generator, torch.float32).item() * len(indices) / count
    return total / draws


GOLDEN = (5**0.5 - 1) / 2


def stratified_timesteps(levels: int, first: int, count: int, seed: int) -> torch.Tensor:
    """Timesteps of the run's samples ``first .. first + count - 1``: the golden-ratio sequence u_i = frac(u_0 +
    i * 0.618...) scaled to ``levels``, with u_0 from the seed. Any stretch of it covers [0, 1) almost evenly
    (a low-discrepancy sequence), so the noise levels a run trains on do not clump by chance as independent
    draws do; each draw alone is still uniform, so the expected loss is the same. Depends only on (seed,
    index): resuming needs no state."""
    u0 = torch.rand((), generator=torch.Generator().manual_seed(step_seed(seed, 0, 0, "timesteps")),
                    dtype=torch.float64).item()
    u = [(u0 + i * GOLDEN) % 1.0 for i in range(first, first + count)]
    return torch.tensor([min(int(x * levels), levels - 1) for x in u], dtype=torch.long)


def step_seed(seed: int, step: int, micro: int, purpose: str) -> int:
    """A seed that depends only on (seed, step, micro-batch, purpose): exact resume needs no RNG state."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """One optimizer over the parameter groups (the vectors; in pivotal mode the adapters), each with its ``lr``."""
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TIError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt "
                          "(or use optimizer 'adamw')") from None
        return Prodigy(groups, lr=groups[0]["lr"], weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=cfg.weight_decay)


def preview_request(cfg: TrainConfig, data: TrainingData) -> PreviewRequest:
    prompt = cfg.preview_prompt or data.caption(0, random.Random(cfg.preview_seed))
    return PreviewRequest(prompt, cfg.preview_negative_prompt, cfg.preview_steps, cfg.preview_cfg_scale,
                          cfg.preview_seed, cfg.preview_width or cfg.width, cfg.preview_height or cfg.height,
                          cfg.preview_sampler)


class _Timer:
    """Wall time per training step, excluding saves and previews."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.start = self.last = time.perf_counter()
        self.paused = 0.0
        self.recent: list[float] = []

    def tick(self) -> None:
        now = time.perf_counter()
        self.recent = (self.recent + [now - self.last])[-20:]
        self.last = now

    def pause(self, work: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        work()
        spent = time.perf_counter() - t0
        self.paused += spent
        self.last += spent

    def seconds_per_step(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else math.nan

    def images_per_s(self) -> float:
        s = self.seconds_per_step()
        return self.images_per_step / s if s and not math.isnan(s) else 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused
