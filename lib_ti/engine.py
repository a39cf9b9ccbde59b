"""The small surface the training loop needs from a model, and the diffusion math around it.

Two implementations exist: ``engines.standalone`` (diffusers + transformers, headless) and the
webui adapter in ``hosts/``. The loop never touches a model object directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from .embedding import Embedding
from .errors import TIError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@runtime_checkable
class Engine(Protocol):
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    encoder_widths: dict[str, int]  # e.g. {"clip_l": 768, "clip_g": 1280}
    device: torch.device
    alphas_cumprod: torch.Tensor  # float32 [num_train_timesteps] on device
    checkpoint_name: str  # shown in saved files: where the vectors were trained
    checkpoint_hash: str
    token_norms: dict[str, float]  # per encoder, the largest norm of a token embedding: the scale vectors live at
    cpu_channels_last: bool  # a float32 run on a CPU may hold the UNet's convs channels-last (``layouts``)

    def init_vectors(self, init_text: str, num_vectors: int) -> dict[str, torch.Tensor]:
        """float32 CPU vectors [num_vectors, width] per encoder, spread from init_text's tokens."""

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B,3,H,W] in [-1,1] -> scaled latent mean and std (float32), for caching."""

    def encode_prompts(
        self, prompts: list[str], token: str, vectors: dict[str, torch.Tensor], size: tuple[int, int]
    ) -> Any:
        """UNet conditioning with ``vectors`` spliced in wherever ``token`` appears; differentiable in the vectors."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The UNet's prediction (epsilon or v, per ``prediction_type``)."""

    def frozen(self) -> Any:
        """Context manager: every model weight has requires_grad False inside, restored after."""

    def step_modules(self) -> list[torch.nn.Module]:
        """The frozen modules a training step runs (UNet and text encoders; not the VAE, which only caches
        latents): what a bf16 run holds in bfloat16 (``halves.held_in_bf16``)."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward: less memory, about 45% more compute."""

    def render_preview(self, request: PreviewRequest, token: str, vectors: dict[str, torch.Tensor]) -> Any:
        """A PIL image for the prompt, with the current vectors."""

    def lora_modules(self, targets: list[str]) -> dict[str, torch.nn.Linear]:
        """The ``nn.Linear`` layers LoRA ``targets`` (formats.lora.TARGETS) name, by their kohya key name."""


TRAINER = "sd-webui-ti-trainer"  # written into every embedding file's metadata
# A vector this many times longer than the encoder's longest token embedding is taken as diverged: diverged
# runs reach 1e24 and more, while trained embeddings stay within a few times that length (the demo's
# 500-step embedding on the micro model: 2.0 times).
MAX_NORM_FACTOR = 1000.0


def embedding_of(engine: Engine, name: str, vectors: dict[str, torch.Tensor], step: int) -> Embedding:
    """A float32 CPU copy of ``vectors`` as an embedding file's content: the step and the checkpoint trained on."""
    return Embedding(name, vectors, step, engine.checkpoint_hash or None, engine.checkpoint_name or None,
                     {"trainer": TRAINER}).detached()


def max_row_norm(table: torch.Tensor) -> float:
    """The largest row norm of a token-embedding table, in float32 (in slices: fp16 tables of SDXL are large)."""
    rows = table.detach()
    return max(float(rows[i:i + 8192].float().norm(dim=1).max()) for i in range(0, rows.shape[0], 8192))


def vector_problem(vectors: dict[str, torch.Tensor], token_norms: dict[str, float]) -> str | None:
    """Why ``vectors`` must not be saved or trained from, or None: a value that is not finite, or a vector far
    longer than any token embedding of its encoder (``MAX_NORM_FACTOR`` times), which only divergence gives."""
    for key, vec in vectors.items():
        norms = vec.detach().double().norm(dim=1)  # float64: a diverged vector's norm may overflow float32
        if not bool(torch.isfinite(vec.detach()).all()):
            return f"the {key} vectors hold NaN or infinite values"
        limit = MAX_NORM_FACTOR * token_norms.get(key, math.inf)
        if float(norms.max()) > limit:
            return (f"a {key} vector has norm {float(norms.max()):.3g}, more than {MAX_NORM_FACTOR:g} times the "
                    f"longest token embedding of the model ({token_norms[key]:.3g})")
    return None


@contextlib.contextmanager
def frozen_modules(modules: Iterable[torch.nn.Module], *, eval_mode: bool) -> Iterator[None]:
    """Inside the block no parameter of ``modules`` requires grad (and, with ``eval_mode``, none is in
    training mode: no dropout); the flags are put back afterwards, also after an error."""
    modules = list(modules)
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    for p, _ in saved:
        p.requires_grad_(False)
    if eval_mode:
        for m in modules:
            m.eval()
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        if eval_mode:
            for m, mode in modes:
                m.train(mode)


class PreviewRequest:
    """What a preview render needs; filled from the config by the trainer."""

    def __init__(
        self,
        prompt: str,
        negative_prompt: str,
        steps: int,
        cfg_scale: float,
        seed: int,
        width: int,
        height: int,
        sampler_name: str = "",
    ):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.cfg_scale, self.seed = steps, cfg_scale, seed
        self.width, self.height = width, height
        self.sampler_name = sampler_name  # a host sampler name; "" = the engine's default (Euler)


# ---------------------------------------------------------------------- diffusion math
def _coeffs(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = alphas_cumprod[timesteps].float()
    shape = (-1,) + (1,) * (ndim - 1)
    return a.sqrt().view(shape), (1 - a).sqrt().view(shape)


def add_noise(
    alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a) x0 + sqrt(1-a) eps."""
    sa, s1a = _coeffs(alphas_cumprod, timesteps, latents.ndim)
    return sa * latents + s1a * noise


def training_target(prediction_type: str, alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should predict: the noise (epsilon) or the velocity v = sqrt(a) eps - sqrt(1-a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        sa, s1a = _coeffs(alphas_cumprod, timesteps, latents.ndim)
        return sa * noise - s1a * latents
    raise TIError(f"unknown prediction type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def min_snr_weights(
    prediction_type: str, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v."""
    a = alphas_cumprod[timesteps].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
