"""The training loop.

Only the embedding's vectors train: they are float32 leaf tensors owned here, spliced into the
prompt by the engine; every model weight stays frozen. Each optimizer step draws its batch, noise
and timesteps from generators seeded by (seed, step), so a resumed run repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import events
from .checkpoints import TrainingState, list_states, load_latest, remove_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import TrainingData, prepare_data
from .embedding import Embedding, match_to_model
from .engine import Engine, PreviewRequest, add_noise, min_snr_weights, training_target
from .errors import TIError
from .latents import LatentCache
from .losslog import LossLog
from .schedule import parse_schedule

MAX_BAD_STEPS = 20  # consecutive non-finite steps before giving up


EventHandler = Callable[[object], None]


def train(engine: Engine, cfg: TrainConfig, *, data: TrainingData | None = None, resume: bool = False,
          on_event: EventHandler | None = None, should_stop: Callable[[], bool] = lambda: False,
          preview_fn: Callable | None = None) -> events.Result:
    """Train ``cfg.name`` on ``engine``; report through ``on_event``; stop cleanly when ``should_stop()``."""
    emit = on_event or (lambda _event: None)
    t_start = time.perf_counter()
    data = data or prepare_data(cfg)
    run = _Run(engine, cfg, data, emit, preview_fn or engine.render_preview)
    run.restore_or_start(resume)
    try:
        with engine.frozen():
            engine.set_gradient_checkpointing(cfg.gradient_checkpointing)
            run.cache_latents()
            emit(events.Started(run.step, run.total, data.num_images, len(data.samples), run.notes,
                                time.perf_counter() - t_start))
            reason = run.loop(should_stop)
    except Exception:
        run.save_after_error()
        raise
    final_path = run.save(is_final=True)
    result = events.Result(run.step, final_path, run.log.last_loss, reason != "done", run.describe(reason),
                           run.skipped)
    emit(result)
    return result


@dataclass
class Batch:
    latents: torch.Tensor
    captions: list[str]
    weights: torch.Tensor | None


class _Run:
    """The state of one training run, and the steps that change it."""

    def __init__(self, engine: Engine, cfg: TrainConfig, data: TrainingData, emit: EventHandler, preview_fn) -> None:
        self.engine, self.cfg, self.data, self.emit, self.preview_fn = engine, cfg, data, emit, preview_fn
        self.lr_schedule = parse_schedule(cfg.learning_rate)
        self.clip_schedule = parse_schedule(cfg.clip_value, what="clip value")
        self.total = self.lr_schedule.planned_steps(cfg.steps)
        self.notes = [n for n in [self.lr_schedule.describe_end(cfg.steps)] if n]
        self.device = engine.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.run_dir = cfg.run_dir
        self.skipped = self.bad_streak = 0

    # ------------------------------------------------------------------ setup
    def restore_or_start(self, resume: bool) -> None:
        state = load_latest(self.run_dir, self.cfg.name) if resume else None
        if state is not None:
            self._check_resumable(state)
            vectors, self.start_step = state.vectors, state.step
        else:
            self._clear_old_run()
            vectors, self.start_step = self._initial_vectors(), 0
        self.step = self.start_step
        self.vectors = {k: v.detach().to(self.device, torch.float32).clone() for k, v in vectors.items()}
        trained = self.cfg.train_encoders or list(self.vectors)
        self.params = [self.vectors[k].requires_grad_(True) for k in self.vectors if k in trained]
        if not self.params:
            raise TIError(f"train_encoders {self.cfg.train_encoders} names none of this model's encoders "
                          f"{list(self.vectors)}")
        self.optimizer = make_optimizer(self.cfg, self.params, self.lr_schedule.value_at(self.step))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == torch.float16)
        self.log = LossLog(self.run_dir / "loss.csv", truncate_after=self.start_step)
        if state is not None:
            self.optimizer.load_state_dict(state.optimizer)
            if state.scaler:
                self.scaler.load_state_dict(state.scaler)
            self.log.restore_pending(state.pending_losses)
        self.cfg.save(self.run_dir / "config.yaml")
        if self.start_step >= self.total:
            self.notes.append(f"the checkpoint is already at step {self.start_step} of {self.total}: nothing to train")

    def _clear_old_run(self) -> None:
        existing = list_states(self.run_dir, self.cfg.name)
        if existing and not self.cfg.overwrite:
            raise TIError(
                f"run folder {str(self.run_dir)!r} already holds checkpoints of {self.cfg.name!r} (last at step "
                f"{existing[-1][0]}): resume it, pick another name or output folder, or allow overwrite"
            )
        for step, _ in existing:  # overwrite: an old run's later checkpoints must not outlive this one's
            remove_checkpoint(self.run_dir, self.cfg.name, step)

    def _initial_vectors(self) -> dict[str, torch.Tensor]:
        if self.cfg.init_from:
            from .formats.embeddings import load_embedding

            emb = match_to_model(load_embedding(self.cfg.init_from), self.engine.encoder_widths)
            if emb.num_vectors != self.cfg.num_vectors:
                self.notes.append(f"init_from {self.cfg.init_from!r} has {emb.num_vectors} vectors per token; "
                                  f"using that instead of num_vectors={self.cfg.num_vectors}")
            return emb.vectors
        return self.engine.init_vectors(self.cfg.init_text, self.cfg.num_vectors)

    def _check_resumable(self, state: TrainingState) -> None:
        widths = {k: int(v.shape[1]) for k, v in state.vectors.items()}
        if widths != self.engine.encoder_widths:
            raise TIError(f"the checkpoint was trained with encoders {widths}, the loaded model has "
                          f"{self.engine.encoder_widths}: resume with the model it was trained on")

    def cache_latents(self) -> None:
        self.latents = LatentCache.build(self.engine, self.data.samples, self.cfg, self.run_dir)

    # ------------------------------------------------------------------ the loop
    def loop(self, should_stop: Callable[[], bool]) -> str:
        timer = _Timer(self.cfg.batch_size * self.cfg.grad_accum)
        while self.step < self.total:
            if should_stop():
                return "stopped"
            lr = self.lr_schedule.value_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = sum(self.backward(micro) for micro in range(self.cfg.grad_accum))
            self.optimizer_step(loss)
            self.step += 1
            timer.tick()
            self.report(loss, lr, timer)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total:
                timer.pause(lambda: self.save(is_final=False))
            if self.cfg.preview_every and self.step % self.cfg.preview_every == 0:
                timer.pause(self.preview)
        return "done"

    def backward(self, micro: int) -> torch.Tensor:
        """One micro-batch: forward, loss (float32), scaled backward. Returns the detached loss."""
        batch = self.draw_batch(micro)
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.step, micro, "noise"))
        loss = batch_loss(self.engine, self.cfg, batch, self.vectors, generator, self.precision) / self.cfg.grad_accum
        self.scaler.scale(loss).backward()
        return loss.detach()

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
        grads_ok = torch.stack([torch.isfinite(p.grad).all() for p in self.params]).all()
        if not bool(torch.isfinite(loss) & grads_ok):  # one host sync per step; the price of never training on NaN
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
            raise TIError(
                f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient (at step {self.step + 1}): "
                "lower the learning rate, use precision bf16 or fp32, or (SDXL) the fp16-fix VAE"
            )

    # ------------------------------------------------------------------ outputs
    def report(self, loss: torch.Tensor, lr: float, timer: "_Timer") -> None:
        logged = self.log.add(self.step, loss, lr, every=self.cfg.log_every, force=self.step == self.total)
        remaining = self.total - self.step
        self.emit(events.Step(self.step, self.total, logged, lr, timer.images_per_s(), timer.elapsed(),
                              remaining * timer.seconds_per_step()))

    def embedding(self) -> Embedding:
        vecs = {k: v.detach().cpu().clone() for k, v in self.vectors.items()}
        return Embedding(self.cfg.name, vecs, self.step, self.engine.checkpoint_hash or None,
                         self.engine.checkpoint_name or None, {"trainer": "sd-webui-ti-trainer"})

    def save(self, is_final: bool) -> Path:
        from .formats.embeddings import save_embedding

        emb = self.embedding()
        state = TrainingState(self.step, emb.vectors, self.optimizer.state_dict(), self.scaler.state_dict()
                              if self.scaler.is_enabled() else None, self.cfg.to_dict(), self.log.pending_values())
        checkpoint = save_checkpoint(self.run_dir, emb, state, self.cfg.save_format, self.cfg.keep_last)
        path = checkpoint
        if is_final:
            path = save_embedding(emb, self.run_dir / f"{self.cfg.name}.{self.cfg.save_format}", overwrite=True)
        self.emit(events.Saved(self.step, path, is_final, checkpoint))
        return path

    def save_after_error(self) -> None:
        """Keep the steps done before a crash (out of memory, a host error): --resume continues from here."""
        if self.step <= self.start_step:
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
            with torch.no_grad():
                image = self.preview_fn(request, self.cfg.name, self.vectors)
        except Exception as exc:  # a broken preview must not cost the user the training run
            self.emit(events.Warning(self.step, f"preview at step {self.step} failed: {type(exc).__name__}: {exc}"))
            return
        from .fileio import atomic_path

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


# ---------------------------------------------------------------------- small helpers

def batch_loss(engine: Engine, cfg: TrainConfig, batch: Batch, vectors: dict[str, torch.Tensor],
               generator: torch.Generator, precision: torch.dtype) -> torch.Tensor:
    """The denoising loss of one batch, in float32; noise and timesteps come from ``generator``."""
    device = engine.device
    noise = torch.randn(batch.latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, len(engine.alphas_cumprod), (noise.shape[0],), generator=generator).to(device)
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

def step_seed(seed: int, step: int, micro: int, purpose: str) -> int:
    """A seed that depends only on (seed, step, micro-batch, purpose): exact resume needs no RNG state."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU autocast is slower than fp32 for these models
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def make_optimizer(cfg: TrainConfig, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TIError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt "
                          "(or use optimizer 'adamw')") from None
        return Prodigy(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


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
