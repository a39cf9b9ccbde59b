"""The seam between the webui glue (runner, API, tabs) and one webui's model side.

Everything the glue needs that depends on how a webui holds its model, its text encoders and its
embedding database is a member of ``Host``; what every A1111-style webui shares (GPU queue and
progress, settings, folders) is in ``gpu_queue``, ``settings`` and ``folders``. One implementation
per host family (``a1111``); ``registry.current_host()`` picks it by what the running webui offers.
A Forge adapter fits the same members: its engine runs the KModel outside inference mode with the
weights loaded by Forge's memory manager, ``session`` gives them back, ``register_file`` fills each
text-processing engine's database.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..engine import Engine, PreviewRequest
from ..errors import TIError
from ..families import FAMILIES


@dataclass(frozen=True)
class LoadedModel:
    """What the tab's defaults and the pre-flight check need of the loaded checkpoint."""

    family: str  # sd1 | sd2 | sdxl, or what the host calls an unsupported one (sd3, unknown)
    training_size: int  # the side the form starts from


@runtime_checkable
class Host(Protocol):
    name: str  # the host family, for messages: "AUTOMATIC1111"
    reason: str  # "" where training works; else the one sentence the tab shows instead of its controls

    def engine(self) -> Engine:
        """The trainer's engine on the loaded checkpoint; a TIError, before any work, where it cannot train."""

    def session(self, engine: Engine, token: str) -> AbstractContextManager[None]:
        """Around a run: everything it changes in the host is put back, also after an error or an interrupt."""

    def register_file(self, path: Path) -> None:
        """Make an embedding file usable in prompts at once (no restart, no refresh button)."""

    def loaded_embeddings(self) -> dict[str, str | None]:
        """The embeddings the host resolves in prompts now: name -> its file (None when it has none)."""

    def txt2img(self, request: PreviewRequest) -> Any:
        """A render (PIL image) on the loaded checkpoint with the embeddings registered now."""

    def self_check(self, init_text: str, prompt: str, weights: bool = False) -> dict:
        """Our conditioning equals the host's own, and the gradient reaches every encoder's vectors."""

    def loaded_model(self) -> LoadedModel | None:
        """The loaded checkpoint, without loading one (None while none is loaded)."""


def training_size(family: str, parameterization: str = "eps", latent_side: int = 0, vae_levels: int = 4) -> int:
    """The training size that fits a model: its family's (512 SD1, 768 SD2-v, 512 SD2-base, 1024 SDXL), or the
    model's own sample size when its config says a smaller one (the micro model: 8 latents x 8 = 64)."""
    side = FAMILIES[family].resolution if family in FAMILIES else 512
    if family == "sd2" and parameterization != "v":
        side = 512
    if latent_side:
        side = min(side, latent_side * 2 ** (vae_levels - 1))
    return side


class UnsupportedHost:
    """A webui the extension cannot train in: every model-side request is refused with the same sentence."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def _refuse(self):
        raise TIError(self.reason)

    def engine(self) -> Engine:
        return self._refuse()

    def session(self, engine: Engine, token: str) -> AbstractContextManager[None]:
        return self._refuse()

    def register_file(self, path: Path) -> None:
        self._refuse()

    def loaded_embeddings(self) -> dict[str, str | None]:
        return {}

    def txt2img(self, request: PreviewRequest) -> Any:
        return self._refuse()

    def self_check(self, init_text: str, prompt: str, weights: bool = False) -> dict:
        return self._refuse()

    def loaded_model(self) -> LoadedModel | None:
        return None
