"""The AUTOMATIC1111 webui as a training host: the one module that touches ``modules.*``.

Everything here runs inside the webui process and imports the host lazily, so ``lib_ti`` stays
importable (and its other modules testable) without a webui. What it provides:

* ``WebuiEngine``: the trainer's ``Engine`` on the checkpoint the host has loaded. Prompts go
  through the host's own hijacked text encoder with the trained vectors registered as a live
  embedding, so training sees exactly the conditioning a txt2img generation builds (emphasis,
  75-token chunks, clip skip); the loss is ours, from ``alphas_cumprod`` and ``apply_model``.
* ``host_session``: freezes the host's weights and puts back everything a run touched
  (requires_grad, registered embeddings, checkpointing patches, medvram hooks, caches, job state),
  also after an error or an interrupt.
* publishing: each saved file is copied into the host's embeddings folder and registered at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import TrainConfig
from ..dataset.blip import load_blip
from ..dataset.caption import per_image
from ..engine import PreviewRequest, frozen_modules, max_row_norm
from ..errors import TIError
from ..families import FAMILIES
from ..fileio import atomic_path, load_torch
from ..formats.lora import UNET, kohya_name, matches, text_kohya_name
from ..halves import weights_digest
from ..options import field_label, field_ui_help
from ..splice import spread_init_vectors

OUTPUT_SUBDIR = ("textual_inversion", "ti-trainer")
SETTINGS_SECTION = ("ti_trainer", "TI Trainer", "training")


# ---------------------------------------------------------------------- the engine
class WebuiEngine:
    """Implements ``lib_ti.engine.Engine`` on ``shared.sd_model``."""

    def __init__(self, sd_model) -> None:
        from modules import devices

        self.model = sd_model
        self.family = model_family(sd_model)
        if self.family not in FAMILIES:
            raise TIError(f"the loaded checkpoint is {self.family.upper()}: training inside the webui supports "
                          "SD1.x, SD2.x and SDXL checkpoints; load one of those")
        self.keys = FAMILIES[self.family].encoders  # in the order of the host's text embedders
        self.prediction_type = {"eps": "epsilon", "v": "v_prediction"}[sd_model.parameterization]
        self.device = devices.device
        self.embedders = dict(zip(self.keys, _text_embedders(sd_model), strict=True))
        with torch.no_grad():
            self.encoder_widths = {k: int(e.encode_embedding_init_text(",", 1).shape[1])
                                   for k, e in self.embedders.items()}
            self.token_norms = {k: max_row_norm(_token_table(e)) for k, e in self.embedders.items()}
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().float().to(self.device)
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.checkpoint_name = getattr(info, "name_for_extra", "") or ""
        self.checkpoint_hash = getattr(info, "shorthash", "") or ""
        self.live = None  # the host Embedding whose .vec is the trained tensor during a run
        self.saved_flags: dict = {}  # SDXL: the UNet blocks' own checkpointing flags, put back after a run

    # ------------------------------------------------------------------ Engine surface
    def init_vectors(self, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
        """The host's own rule (textual_inversion.create_embedding): the first n init tokens, spread."""
        out = {}
        for key, embedder in self.embedders.items():
            width = self.encoder_widths[key]
            tokens = torch.zeros(0, width)
            if init_text:
                with torch.no_grad():
                    tokens = embedder.encode_embedding_init_text(init_text, num_vectors)
            out[key] = spread_init_vectors(tokens.detach().float().cpu(), num_vectors, width)
        return out

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from modules import devices

        mean, std = self._encode(pixels, devices.dtype_vae)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            mean, std = self._encode_fp32(pixels)  # a half-precision VAE can overflow; latents must never be NaN
        return mean, std

    def _encode(self, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = float(self.model.scale_factor)
        x = pixels.to(self.device, dtype)
        if self.family != "sdxl":
            dist = self.model.encode_first_stage(x)
            return dist.mean.float() * scale, dist.std.float() * scale
        # sgm's encode_first_stage returns one scaled sample; the cache keeps the distribution.
        vae = self.model.first_stage_model
        if getattr(self.model, "lowvram", False):
            vae.to(self.device)  # medvram: the host's hook would move it only for vae.encode
        mean, logvar = vae.quant_conv(vae.encoder(x)).float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean * scale, std * scale

    def _encode_fp32(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.first_stage_model
        dtype = next(vae.parameters()).dtype
        vae.to(torch.float32)
        try:
            with torch.autocast(self.device.type, enabled=False):
                mean, std = self._encode(pixels, torch.float32)
        finally:
            vae.to(dtype)
        if not torch.isfinite(mean).all():
            raise TIError("the VAE gives non-finite latents for this dataset even in float32: check the images "
                          "and the checkpoint's VAE")
        return mean, std

    def encode_prompts(self, prompts: list[str], token: str, vectors: dict[str, torch.Tensor], size):
        self.set_live(token, vectors)
        if self.family != "sdxl":
            return self.model.cond_stage_model(prompts)
        from modules.prompt_parser import SdConditioning

        # The host's own SDXL conditioning (crossattn + pooled vector with the size/crop embeddings), as
        # for a generation at this size; sgm runs non-trainable embedders under no_grad, hence the flag.
        batch = SdConditioning(prompts, width=size[1], height=size[0])
        with _text_embedders_trainable(self.model):
            return self.model.get_learned_conditioning(batch)

    def _host_vec(self, vectors: dict[str, torch.Tensor]):
        """The host splices ``vec`` (one tensor) or ``vec[key]`` (SDXL) into each text encoder."""
        return dict(vectors) if self.family == "sdxl" else vectors[self.keys[0]]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.apply_model(noisy_latents, timesteps, cond)

    def frozen(self):
        # No eval(): the host's modules stay in the mode the host keeps them in.
        return frozen_modules([self.model], eval_mode=False)

    def step_modules(self) -> list[torch.nn.Module]:
        return [self.model.model, self.model.cond_stage_model]  # the VAE (first_stage_model) is left as it is

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if self.family == "sdxl":
            # sgm's UNet config asks every block to checkpoint itself: ~45% slower, only worth it when
            # memory asks. The flags are put back in host_session.
            for module, attr in _sgm_checkpoint_flags(self.model):
                self.saved_flags.setdefault((module, attr), getattr(module, attr))
                setattr(module, attr, enabled)
            return
        from modules import sd_hijack_checkpoint

        if enabled:
            sd_hijack_checkpoint.add()
        else:
            sd_hijack_checkpoint.remove()

    def restore_checkpoint_flags(self) -> None:
        for (module, attr), value in self.saved_flags.items():
            setattr(module, attr, value)
        self.saved_flags.clear()

    @torch.no_grad()
    def render_preview(self, request: PreviewRequest, token: str, vectors: dict[str, torch.Tensor]):
        """A txt2img render through the host's own processing (sampler, CFG, seed), with the current vectors."""
        self.set_live(token, {k: v.detach() for k, v in vectors.items()})
        return _render(self.model, request)

    def lora_modules(self, targets: list[str]) -> dict[str, torch.nn.Linear]:
        """The host's ldm/sgm modules are named as kohya names them: ``lora_unet_`` + their path."""
        unet_targets = [t for t in targets if t != "text"]
        found = {kohya_name(UNET, path): module for path, module in self.model.model.diffusion_model.named_modules()
                 if isinstance(module, torch.nn.Linear) and matches(unet_targets, path)}
        if "text" in targets:
            if self.family != "sd1":
                raise TIError("LoRA target 'text' works in the webui on SD1.x checkpoints only (the OpenCLIP encoders "
                              "of SD2 and SDXL keep q, k and v in one fused layer): leave 'text' out")
            encoder = self.embedders["clip_l"].wrapped.transformer  # transformers' CLIPTextModel
            found.update({text_kohya_name("lora_te", path): module for path, module in encoder.named_modules()
                          if isinstance(module, torch.nn.Linear) and matches(["text"], path)})
        return found

    # ------------------------------------------------------------------ the live embedding
    def set_live(self, token: str, vectors: dict[str, torch.Tensor]) -> None:
        live = self.live_embedding(token)
        live.vec = self._host_vec(vectors)
        # The host reserves ``vectors`` prompt tokens for an embedding and splices as many rows as the
        # tensor has: a smaller count would overwrite the tokens that follow the name.
        live.vectors = next(iter(vectors.values())).shape[0]

    def live_embedding(self, token: str):
        """Register (once per run) a host Embedding named ``token``; its ``vec`` is the trained tensor. Registered
        again when the host dropped it: its Textual Inversion cards' refresh reloads every embedding from disk."""
        if self.live is not None and self.live.name == token and not _registered(self.live, token):
            from modules import sd_hijack

            sd_hijack.model_hijack.embedding_db.register_embedding(self.live, self.model)
        if self.live is None or self.live.name != token:
            from modules import sd_hijack
            from modules.textual_inversion.textual_inversion import Embedding as HostEmbedding

            zeros = {k: torch.zeros(1, w, device=self.device) for k, w in self.encoder_widths.items()}
            live = HostEmbedding(self._host_vec(zeros), token)
            live.shape, live.vectors = sum(self.encoder_widths.values()), 1
            sd_hijack.model_hijack.embedding_db.register_embedding(live, self.model)
            self.live = live
        return self.live


@torch.no_grad()
def _render(sd_model, request: PreviewRequest):
    """One image through the host's own txt2img processing, the training job's state kept around it."""
    from modules import processing, shared

    reset_conditioning_cache()
    # scheduler "Automatic": the host's default, named, so that it logs no "autocorrection" per render.
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=request.prompt, negative_prompt=request.negative_prompt,
        steps=request.steps, sampler_name=request.sampler_name or "Euler", scheduler="Automatic",
        cfg_scale=request.cfg_scale, seed=request.seed, width=request.width, height=request.height,
        do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True)
    with _job_state_kept(shared.state), _quiet_total_progress(shared), contextlib.closing(p):
        processed = processing.process_images(p)
    reset_conditioning_cache()
    if not processed.images:
        raise TIError("the render returned no image (interrupted?)")
    return processed.images[0]


def txt2img(request: PreviewRequest):
    """A render on the loaded checkpoint with the embeddings registered now (the comparison grid's cells)."""
    from modules import shared

    if shared.sd_model is None:
        raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page")
    return _render(shared.sd_model, request)


def _registered(embedding, token: str) -> bool:
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db.word_embeddings.get(token) is embedding


# Where the host's embedders keep their token-embedding layer: CLIP (SD1, SDXL's clip_l), OpenCLIP (SD2,
# SDXL's clip_g), XLM-R (Alt Diffusion). The host's hijack wraps the layer; its own is ``.wrapped``.
_TOKEN_LAYERS = ("transformer.text_model.embeddings.token_embedding", "model.token_embedding",
                 "roberta.embeddings.token_embedding")
_SAMPLE_TEXT = "a photo of the person cat dog house city art painting red blue green"


def _token_table(embedder) -> torch.Tensor:
    """The token-embedding weight of a host text embedder; for one laid out otherwise, the embeddings of a
    sample of common words (what its own ``encode_embedding_init_text`` gives), a smaller sample of the table."""
    for path in _TOKEN_LAYERS:
        layer = getattr(embedder, "wrapped", None)
        for attr in path.split("."):
            layer = getattr(layer, attr, None)
        weight = getattr(getattr(layer, "wrapped", layer), "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    return embedder.encode_embedding_init_text(_SAMPLE_TEXT, 75)


def _text_embedders(sd_model) -> list:
    if getattr(sd_model, "is_sdxl", False):
        return [e for e in sd_model.conditioner.embedders if hasattr(e, "encode_embedding_init_text")]
    return [sd_model.cond_stage_model]


@contextlib.contextmanager
def _text_embedders_trainable(sd_model) -> Iterator[None]:
    embedders = _text_embedders(sd_model)
    saved = [e.is_trainable for e in embedders]
    for e in embedders:
        e.is_trainable = True
    try:
        yield
    finally:
        for e, flag in zip(embedders, saved, strict=True):
            e.is_trainable = flag


def _sgm_checkpoint_flags(sd_model) -> list[tuple[object, str]]:
    flags = []
    for module in sd_model.model.diffusion_model.modules():
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(module, attr, None), bool):
                flags.append((module, attr))
    return flags


def model_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    return "unknown"


def current_engine() -> WebuiEngine:
    """The engine on the loaded checkpoint; refuses, before any work, where training cannot work."""
    from modules import shared

    if shared.cmd_opts.lowvram:
        raise TIError("--lowvram moves each UNet block to the GPU only for its own forward pass, so a backward "
                      "pass cannot run: restart the webui with --medvram (or without either) to train")
    model = shared.sd_model
    if model is None or not hasattr(model, "cond_stage_model"):
        raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page")
    return WebuiEngine(model)


# ---------------------------------------------------------------------- putting the host back
@contextlib.contextmanager
def host_session(engine: WebuiEngine, token: str) -> Iterator[None]:
    """Everything a run changes in the host is put back afterwards, also after an error or an interrupt."""
    from modules import sd_hijack

    db = sd_hijack.model_hijack.embedding_db
    previous = db.word_embeddings.get(token)
    hooks = _medvram_pinned(engine.model)
    try:
        yield
    finally:
        if engine.family == "sdxl":
            engine.restore_checkpoint_flags()
        else:
            engine.set_gradient_checkpointing(False)
        hooks.close()
        if engine.live is not None:
            db.register_embedding_by_name(previous, engine.model, token)  # None unregisters our live one
            engine.live = None
        sd_hijack.model_hijack.clear_comments()
        reset_conditioning_cache()


class _medvram_pinned:
    """With --medvram the host moves the text encoder, UNet and VAE to the GPU one at a time, in forward
    hooks. Training needs the text encoder and the UNet together (backward runs through both), so
    while a run lasts those hooks are lifted, the VAE goes to the CPU and the other two stay on the GPU."""

    def __init__(self, sd_model) -> None:
        from modules import devices, lowvram

        self.model = sd_model
        self.removed: list[tuple[dict, int, object]] = []
        if not getattr(sd_model, "lowvram", False):
            return
        lowvram.send_everything_to_cpu()
        for module in (sd_model.cond_stage_model, sd_model.model):
            for sub in module.modules():
                for key, hook in list(sub._forward_pre_hooks.items()):
                    if getattr(hook, "__name__", "") == "send_me_to_gpu":
                        self.removed.append((sub._forward_pre_hooks, key, hook))
                        del sub._forward_pre_hooks[key]
            module.to(devices.device)

    def close(self) -> None:
        if not self.removed:
            return
        from modules import lowvram

        for hooks, key, hook in self.removed:
            hooks[key] = hook
        self.removed.clear()
        # Back to the host's invariant: nothing tracked is on the GPU until its next forward pass.
        lowvram.module_in_gpu = None
        for module in (self.model.cond_stage_model, self.model.model):
            module.to(lowvram.cpu)


def reset_conditioning_cache() -> None:
    """The host caches prompt conditioning by prompt text, not by embedding contents (webui #11993):
    after the vectors change, a cached conditioning would render the old embedding."""
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


JOB_FIELDS = ("job", "job_no", "job_count", "textinfo", "sampling_step", "sampling_steps",
              "processing_has_refined_job_count", "time_start")
STOP_FLAGS = ("interrupted", "skipped", "stopping_generation")


@contextlib.contextmanager
def _job_state_kept(state) -> Iterator[None]:
    """A preview render runs the host's txt2img, which rewrites the job fields of ``shared.state`` and
    clears its Skip flag at the start of each image: a stop request made before or during the render
    must still stop the run after it."""
    saved = {k: getattr(state, k, None) for k in JOB_FIELDS}
    flags = {k: bool(getattr(state, k, False)) for k in STOP_FLAGS}
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(state, k, v)
        for k, was_set in flags.items():
            setattr(state, k, was_set or bool(getattr(state, k, False)))


class _SilentTotal:
    """Stands in for the host's console "Total progress" bar during a preview render: that bar's total is
    job_count x sampling steps, i.e. training steps x preview steps, and would spill into the next txt2img."""

    def update(self) -> None:
        pass

    def updateTotal(self, new_total) -> None:  # noqa: N802 - the host's method name
        pass

    def reset(self) -> None:
        pass

    def clear(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_total_progress(shared) -> Iterator[None]:
    saved = getattr(shared, "total_tqdm", None)
    shared.total_tqdm = _SilentTotal()
    try:
        yield
    finally:
        shared.total_tqdm = saved


# ---------------------------------------------------------------------- folders and publishing
def embeddings_dir() -> Path:
    from modules import shared

    return Path(shared.cmd_opts.embeddings_dir)


def output_root() -> Path:
    """--ti-trainer-output-dir, else the setting, else <data dir>/textual_inversion/ti-trainer."""
    from modules import paths_internal, shared

    flag = getattr(shared.cmd_opts, "ti_trainer_output_dir", None)
    return Path(flag or setting("output_dir") or Path(paths_internal.data_path).joinpath(*OUTPUT_SUBDIR))


def checkpoint_subdir() -> str:
    return setting("checkpoint_subdir") or "ti-trainer"


def data_folder() -> Path:
    """The webui's data folder (--data-dir; by default its install folder)."""
    from modules import paths_internal

    return Path(paths_internal.data_path)


def templates_dir() -> Path:
    """The host's own textual-inversion template folder (--textual-inversion-templates-dir)."""
    from modules import shared

    return Path(shared.cmd_opts.textual_inversion_templates_dir)


def extra_read_roots() -> list[Path]:
    """The folders --ti-trainer-allowed-roots and the allowed-roots setting add, each a list like PATH's."""
    from modules import shared

    text = "\n".join([getattr(shared.cmd_opts, "ti_trainer_allowed_roots", None) or "", str(setting("allowed_roots"))])
    return [Path(part.strip()).expanduser() for line in text.splitlines() for part in line.split(os.pathsep)
            if part.strip()]


def ui_exposed() -> bool:
    """Whether others than the machine's own user may reach the UI: the host's own rule (--share, --listen,
    --ngrok or --server-name, without --enable-insecure-extension-access), which it uses for its Extensions tab."""
    from modules import shared

    return bool(getattr(shared.cmd_opts, "disable_extension_access", False))


def publish(path: Path, target: Path) -> Path:
    """Copy a saved embedding into the embeddings folder (atomically) and register it with the host now."""
    copy_file(path, target)
    register_file(target)
    return target


def copy_file(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)


def lora_dir() -> Path:
    """The host's Lora folder (--lora-dir, which its built-in Lora extension adds; by default models/Lora)."""
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")


def publish_lora(path: Path, target: Path) -> Path:
    """Copy a pivotal run's LoRA into the Lora folder (atomically) and have the host list it at once, so that
    ``<lora:name:1>`` works in the next txt2img without the refresh button."""
    import sys

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)
    networks = sys.modules.get("networks")  # the built-in Lora extension's module, when it is enabled
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()
    return target


def register_file(path: Path) -> None:
    """Make a file usable in prompts at once: no restart, no refresh button; its hash goes to "TI hashes"."""
    from modules import sd_hijack, shared
    from modules.textual_inversion.textual_inversion import create_embedding_from_data

    data = _read_for_host(path)
    emb = create_embedding_from_data(data, path.stem, filename=path.name, filepath=str(path))
    db = sd_hijack.model_hijack.embedding_db
    if db.expected_shape not in (-1, emb.shape):
        raise TIError(f"{path.name} has width {emb.shape}, the loaded checkpoint expects {db.expected_shape}")
    db.register_embedding(emb, shared.sd_model)
    reset_conditioning_cache()


def _read_for_host(path: Path) -> dict:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    return load_torch(path)


def loaded_embedding_names() -> list[str]:
    from modules import sd_hijack

    return sorted(sd_hijack.model_hijack.embedding_db.word_embeddings)


def loaded_embedding_file(name: str) -> str | None:
    from modules import sd_hijack

    emb = sd_hijack.model_hijack.embedding_db.word_embeddings.get(name)
    return getattr(emb, "filename", None) if emb is not None else None


# ---------------------------------------------------------------------- the host's job and progress
# The host's progress bar (/internal/progress) shows job_no / job_count and an ETA it extrapolates from
# shared.state.time_start over the whole job, data loading and the steps a resumed run had already done
# included. Set from our own clock instead: this session's steps per second since the first step.
_clock: dict[str, float] = {}


def progress_text(name: str, step: int, total: int) -> str:
    """Plain text the host's bar shows before its percentage (never HTML: it shows text, not markup)."""
    return f"Training {name}: step {step}/{total}"


def host_time_start(now: float, started: float, start_step: int, step: int, total: int) -> float | None:
    """The ``time_start`` for which the host's ETA, elapsed * (1 - p) / p with p = step / total, equals this
    session's linear extrapolation (seconds per step since ``started`` times the steps left)."""
    done = step - start_step
    if done <= 0 or not 0 < step < total:
        return None
    eta = (now - started) / done * (total - step)
    p = step / total
    return now - eta * p / (1 - p)


def progress_begin(total_steps: int, start_step: int, name: str = "") -> None:
    import time

    from modules import shared

    _clock.update(started=time.time(), start_step=start_step, job_start=shared.state.time_start or time.time())
    shared.state.job_count, shared.state.job_no = total_steps, start_step
    shared.state.sampling_step = shared.state.sampling_steps = 0
    shared.state.textinfo = progress_text(name, start_step, total_steps)


def progress_step(step: int, total_steps: int, name: str = "") -> None:
    import time

    from modules import shared

    shared.state.job_count, shared.state.job_no = total_steps, step
    shared.state.textinfo = progress_text(name, step, total_steps)
    if _clock:
        start = host_time_start(time.time(), _clock["started"], int(_clock["start_step"]), step, total_steps)
        if start is not None:
            shared.state.time_start = start


def progress_end() -> None:
    """The host logs the job's duration from time_start: give it back the real start."""
    if not _clock:
        return
    from modules import shared

    shared.state.time_start = _clock.pop("job_start")
    _clock.clear()


def progress_image(image) -> None:
    from modules import shared

    shared.state.assign_current_image(image)


def host_interrupted() -> bool:
    """The host's Interrupt (first click: "stop after this image", second: now), Skip, and /sdapi/v1/interrupt
    all stop a run at the next step like our Stop button: a training run has no "current image" to finish."""
    from modules import shared

    return any(bool(getattr(shared.state, flag, False)) for flag in STOP_FLAGS)


@contextlib.contextmanager
def gpu_job(task_id: str) -> Iterator[None]:
    """What the host's wrap_gradio_gpu_call does for the tab, for runs started from the API: hold the GPU
    queue lock (no collision with a generation) and register the task so progress polling works."""
    from modules import call_queue, progress, shared

    progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        shared.state.begin(job=task_id)
        progress.start_task(task_id)
        try:
            yield
        finally:
            progress.finish_task(task_id)
            shared.state.end()
            shared.state.interrupted = False


def wrap_gpu_call(fn, extra_outputs: list):
    from modules.call_queue import wrap_gradio_gpu_call

    return wrap_gradio_gpu_call(fn, extra_outputs=extra_outputs)


# ---------------------------------------------------------------------- settings
# The extension's own settings: key (prefixed ti_trainer_ in the host) -> (default, label). Config fields
# marked ``setting`` get a setting too: the default the tab starts from (``config_defaults``).
HOST_SETTINGS: dict[str, tuple[object, str]] = {
    "output_dir": ("", "Folder for training runs (checkpoints, previews, loss logs); empty = "
                       "textual_inversion/ti-trainer in the data folder. --ti-trainer-output-dir wins"),
    "checkpoint_subdir": ("ti-trainer", "Sub-folder of the embeddings folder for checkpoint copies (name-STEP)"),
    "allowed_roots": ("", "Extra folders API requests may read datasets, templates and embeddings from, besides "
                          f"the webui's data folder; separated by '{os.pathsep}' or new lines. "
                          "--ti-trainer-allowed-roots adds more"),
}
# Settings that name folders: never changed through the API (/sdapi/v1/options), and frozen by the host's
# --hide-ui-dir-config like its own folder settings; else a request could move the folders it is confined to.
PATH_SETTINGS = ("output_dir", "checkpoint_subdir", "allowed_roots")


def _setting_fields() -> list:
    from dataclasses import fields

    return [f for f in fields(TrainConfig) if f.metadata.get("setting")]


def _settings_table() -> dict[str, tuple[object, str]]:
    table = dict(HOST_SETTINGS)
    for f in _setting_fields():
        table[f.name] = (f.default, f"Default: {field_label(f)} ({field_ui_help(f)})")
    return table


def register_settings() -> None:
    """Our own section of the webui's Settings, under the "training" category; keys prefixed ti_trainer_."""
    import typing

    import gradio as gr
    from modules import shared

    hints = typing.get_type_hints(TrainConfig)
    options = {}
    for key, (default, label) in _settings_table().items():
        if key in hints and typing.get_origin(hints[key]) is typing.Literal:
            options[key] = shared.OptionInfo(default, label, gr.Radio, {"choices": list(typing.get_args(hints[key]))})
        else:
            options[key] = shared.OptionInfo(default, label)
        if key in PATH_SETTINGS:
            options[key].restrict_api = True  # read by the host's Options.set (webui >= 1.7)
    for key, info in shared.options_section(SETTINGS_SECTION, options).items():
        shared.opts.add_option(f"ti_trainer_{key}", info)
    if isinstance(shared.restricted_opts, set):
        shared.restricted_opts.update(f"ti_trainer_{key}" for key in PATH_SETTINGS)


def setting(key: str):
    from modules import shared

    return shared.opts.data.get(f"ti_trainer_{key}", _settings_table()[key][0])


def config_defaults() -> dict[str, object]:
    """The config fields whose defaults the webui owner set in Settings."""
    return {f.name: setting(f.name) for f in _setting_fields()}


def api_credentials() -> dict[str, str]:
    """--api-auth "user:pass,user2:pass2", parsed as the host's Api class does."""
    from modules import shared

    creds = {}
    for pair in (shared.cmd_opts.api_auth or "").split(","):
        if ":" in pair:
            user, password = pair.strip().split(":", 1)
            creds[user] = password
    return creds


def api_enabled() -> bool:
    from modules import shared

    return bool(shared.cmd_opts.api or shared.cmd_opts.nowebui)


# ---------------------------------------------------------------------- self-check
def self_check(init_text: str = "a photo", prompt: str = "a {} on a table", size: tuple[int, int] = (512, 512),
               weights: bool = False) -> dict:
    """Verify the adapter in the running host, on the loaded checkpoint (used by tests and support):

    * with the vectors equal to the init text's token embeddings, our conditioning for a prompt
      with the token equals the host's own generation conditioning for the prompt with the init text;
    * a loss on that conditioning sends a gradient to the vectors of every text encoder;
    * with ``weights``, a digest of every weight of the loaded checkpoint: the same before and after a run
      shows that the run left the host's model bit-identical (bf16 runs convert it for their duration).
    """
    from modules import shared

    engine = current_engine()
    token = "tiselfcheck"
    tokens = len(engine.embedders[engine.keys[0]].encode_embedding_init_text(init_text, 75))
    vectors = {k: v.to(engine.device).requires_grad_(True) for k, v in engine.init_vectors(init_text, tokens).items()}
    with host_session(engine, token), engine.frozen():
        ours = engine.encode_prompts([prompt.format(token)], token, vectors, size)
        with torch.no_grad():
            host = _host_conditioning(engine, prompt.format(init_text), size)
        diffs = {name: float((a.detach().float() - b.float()).abs().max()) for name, a, b in _pairs(ours, host)}
        torch.stack([a.float().pow(2).sum() for _, a, _ in _pairs(ours, host)]).sum().backward()
    grads = {k: float(v.grad.norm()) if v.grad is not None else 0.0 for k, v in vectors.items()}
    ok = all(d < 1e-4 for d in diffs.values()) and all(g > 0 for g in grads.values())
    return {"ok": ok, "family": engine.family, "checkpoint": getattr(shared.sd_model.sd_checkpoint_info, "name", ""),
            "widths": engine.encoder_widths, "vectors": tokens, "max_abs_diff": diffs, "grad_norm": grads,
            **({"weights_digest": weights_digest([engine.model])} if weights else {})}


def _host_conditioning(engine: WebuiEngine, prompt: str, size: tuple[int, int]):
    if engine.family != "sdxl":
        return engine.model.cond_stage_model([prompt])
    from modules.prompt_parser import SdConditioning

    return engine.model.get_learned_conditioning(SdConditioning([prompt], width=size[1], height=size[0]))


def _pairs(ours, host) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(ours, dict):
        return [(k, ours[k], host[k]) for k in sorted(ours)]
    return [("cond", ours, host)]


# ---------------------------------------------------------------------- dataset tools
def progress_count(done: int, total: int, _path=None) -> None:
    """Progress of a prepare/caption job in the host's job state (the tab's progress, /sdapi/v1/progress)."""
    from modules import shared

    shared.state.job_count, shared.state.job_no = total, done


@contextlib.contextmanager
def captioner(model: str | None) -> Iterator:
    """A ``captioner(images) -> captions``: the host's BLIP (``model`` None) or a local transformers BLIP.

    The host's interrogator is used BLIP-only (load, caption, back to RAM): its ``interrogate()``
    would also rank CLIP terms and reset the host's job state, which a running job must keep.
    """
    if model:
        from modules import devices

        yield load_blip(model, device=str(devices.device))
        return
    from modules import devices, paths, shared

    weights = Path(paths.models_path) / "BLIP"
    if not any(weights.glob("*.pth")):
        raise TIError(f"the webui's BLIP captioner needs its weights in {weights}: "
                      "model_base_caption_capfilt_large.pth, which the webui downloads on first use from "
                      "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
                      "model_base_caption_capfilt_large.pth. Put that file there, or give a local "
                      "transformers BLIP model folder instead")
    host = shared.interrogator
    if host.blip_model is None:
        try:
            host.blip_model = host.load_blip_model()
        except Exception as exc:  # e.g. offline without the bert-base-uncased tokenizer BLIP also loads
            raise TIError(f"the webui's BLIP captioner could not load ({type(exc).__name__}: {exc}); give a local "
                          "transformers BLIP model folder instead") from exc
        if not shared.cmd_opts.no_half and not host.running_on_cpu:
            host.blip_model = host.blip_model.half()
    host.blip_model = host.blip_model.to(devices.device_interrogate)
    host.dtype = next(host.blip_model.parameters()).dtype  # generate_caption reads it; load() would set it
    try:
        yield per_image(host.generate_caption)
    finally:
        host.send_blip_to_ram()


def training_size(family: str, parameterization: str = "eps", latent_side: int = 0, vae_levels: int = 4) -> int:
    """The training size that fits a model: its family's (512 SD1, 768 SD2-v, 512 SD2-base, 1024 SDXL), or the
    model's own sample size when its config says a smaller one (the micro model: 8 latents x 8 = 64)."""
    side = FAMILIES[family].resolution if family in FAMILIES else 512
    if family == "sd2" and parameterization != "v":
        side = 512
    if latent_side:
        side = min(side, latent_side * 2 ** (vae_levels - 1))
    return side


def loaded_model_size() -> int | None:
    """``training_size`` of the loaded checkpoint, without loading one (None when none is loaded)."""
    from modules import sd_models, shared

    model = sd_models.model_data.sd_model if hasattr(sd_models, "model_data") else shared.sd_model
    if model is None:
        return None
    family = model_family(model)
    latent = getattr(model, "image_size", 0)
    encoder = getattr(getattr(model, "first_stage_model", None), "encoder", None)
    levels = getattr(encoder, "num_resolutions", 4)
    return training_size(family, getattr(model, "parameterization", "eps"),
                         latent if isinstance(latent, int) else 0, levels if isinstance(levels, int) else 4)


def computes_on_cpu() -> bool:
    """Whether the host computes on the CPU (--use-cpu all, or no GPU): memory estimates then speak of RAM."""
    from modules import devices

    return getattr(devices.device, "type", "cpu") == "cpu"


def loaded_family() -> str | None:
    """sd1/sd2/sdxl of the loaded checkpoint, without loading one (None when none is loaded)."""
    from modules import sd_models, shared

    model = sd_models.model_data.sd_model if hasattr(sd_models, "model_data") else shared.sd_model
    family = model_family(model) if model is not None else None
    return family if family in FAMILIES else None
