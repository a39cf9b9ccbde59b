"""The embedding itself: a name plus float32 vectors for each text encoder.

Keys name the text encoder a tensor belongs to (``families``: clip_l, clip_h, clip_g).

Files written by other tools for one-encoder models carry no encoder name, so a
single tensor is matched to a one-encoder model by its width (see ``match_to_model``).
File formats live in ``embedding_io``; this module knows nothing about files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import TIError
from .families import SDXL_KEYS


@dataclass
class Embedding:
    name: str
    vectors: dict[str, torch.Tensor]  # encoder key -> float32 [n_vectors, width]
    step: int = 0
    sd_checkpoint: str | None = None  # short hash of the checkpoint it was trained on
    sd_checkpoint_name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # free-form text metadata

    def __post_init__(self) -> None:
        if not self.vectors:
            raise TIError(f"embedding {self.name!r} has no vectors")
        counts = {k: v.shape[0] for k, v in self.vectors.items()}
        for key, vec in self.vectors.items():
            if vec.ndim != 2:
                raise TIError(
                    f"embedding {self.name!r}: vectors for {key!r} must be 2-D [n, width], got shape {tuple(vec.shape)}"
                )
        if len(set(counts.values())) != 1:
            raise TIError(f"embedding {self.name!r}: encoders disagree on the number of vectors: {counts}")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[1]) for k, v in self.vectors.items()}

    @property
    def is_sdxl(self) -> bool:
        return set(self.vectors) == set(SDXL_KEYS)

    def detached(self) -> Embedding:
        """A float32 CPU copy, safe to save while training goes on."""
        vecs = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()}
        return Embedding(self.name, vecs, self.step, self.sd_checkpoint, self.sd_checkpoint_name, dict(self.extra))


def describe_widths(widths: dict[str, int]) -> str:
    return " + ".join(f"{k} {w}" for k, w in widths.items())


def match_to_model(emb: Embedding, model_widths: dict[str, int]) -> Embedding:
    """Return ``emb`` with its keys renamed to the model's encoders, or raise a clear error.

    A single tensor fits a one-encoder model when the widths agree, whatever it was called.
    """
    if len(emb.vectors) == 1 and len(model_widths) == 1:
        (key, vec), (model_key, width) = next(iter(emb.vectors.items())), next(iter(model_widths.items()))
        if vec.shape[1] != width:
            raise TIError(
                f"embedding {emb.name!r} was trained for width {vec.shape[1]}, this model has {width}: "
                "it belongs to another model family (768 = SD1.x, 1024 = SD2.x); load the matching checkpoint "
                "or start a new embedding"
            )
        if key == model_key:
            return emb
        return Embedding(emb.name, {model_key: vec}, emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name, emb.extra)
    if set(emb.vectors) != set(model_widths):
        raise TIError(
            f"embedding {emb.name!r} has encoders {describe_widths(emb.widths)}, this model has "
            f"{describe_widths(model_widths)}: an SD1/SD2 embedding cannot be trained on SDXL or the other way round; "
            "load the matching checkpoint or start a new embedding"
        )
    for key, width in model_widths.items():
        if emb.vectors[key].shape[1] != width:
            raise TIError(
                f"embedding {emb.name!r} was trained for {key} width {emb.vectors[key].shape[1]}, "
                f"this model has {width}"
            )
    return emb
