"""Forge (lllyasviel's "Forge2"; Forge Neo shares its engine) as a training host: the model side of ``Host``.

The engine is ``forge_engine.ForgeEngine``. Here: putting back what a run changed (each text engine's database
entry for the token, the weights' requires_grad flags), registering saved files where Forge looks them up, renders
through its txt2img, and the self-check. Forge keeps one embedding database per text-processing engine, filled
only when a checkpoint loads, plus a separate one for the Textual Inversion cards
(``modules.ui_extra_networks_textual_inversion``): a saved file goes into all of them at once.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..engine import PreviewRequest
from ..errors import TIError
from ..halves import weights_digest
from .a1111 import _pairs, _read_for_host
from .a1111_engine import render, reset_conditioning_cache
from .forge_engine import ForgeEngine, conditioning, forge_family, refusal
from .host import Host, LoadedModel, training_size
from .registry import loaded_sd_model

CARDS_MODULE = "modules.ui_extra_networks_textual_inversion"


class ForgeHost:
    """Implements ``hosts.host.Host`` on Forge's diffusion engine and its per-engine embedding databases."""

    name = "Forge"
    reason = ""

    def engine(self) -> ForgeEngine:
        model = loaded_sd_model()
        if model is None or getattr(model, "forge_objects", None) is None:
            raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page "
                          "(Forge loads it at the first generation)")
        return ForgeEngine(model)

    def session(self, engine, token: str):
        return host_session(engine, token)

    def register_file(self, path: Path) -> None:
        """Usable in prompts at once: in each text engine's database, and listed among the cards."""
        from backend.text_processing.textual_inversion import create_embedding_from_data

        model = _model()
        data = _read_for_host(path)
        for db in _databases(model):
            emb = create_embedding_from_data(data, path.stem, filename=path.name, filepath=str(path))
            if db.expected_shape not in (-1, emb.shape):
                raise TIError(f"{path.name} has width {emb.shape}, the loaded checkpoint expects {db.expected_shape}")
            db.register_embedding(emb)
        cards = sys.modules.get(CARDS_MODULE)
        if cards is not None:
            cards.embedding_db.load_from_file(str(path), path.name)
        reset_conditioning_cache()

    def loaded_embeddings(self) -> dict[str, str | None]:
        model = loaded_sd_model()
        dbs = _databases(model) if model is not None else []
        if not dbs:
            return {}
        words = dbs[0].word_embeddings
        return {name: getattr(words[name], "filename", None) for name in sorted(words)}

    def txt2img(self, request: PreviewRequest):
        return render(_model(), request)

    def self_check(self, init_text: str = "a photo", prompt: str = "a {} on a table", weights: bool = False) -> dict:
        return self_check(self.engine(), init_text, prompt, weights=weights)

    def loaded_model(self) -> LoadedModel | None:
        model = loaded_sd_model()
        if model is None:
            return None
        family = forge_family(model)
        return LoadedModel(family, training_size(family, "eps"))


HOST: Host = ForgeHost()  # typed: mypy checks the adapter against the seam


def _model():
    model = loaded_sd_model()
    if model is None:
        raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page")
    return model


def _databases(model) -> list:
    """Each text-processing engine's embedding database (SD1: one; SDXL: clip_l's and clip_g's)."""
    names = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")
    engines = [getattr(model, n, None) for n in names]
    return [e.embeddings for e in engines if e is not None]


@contextlib.contextmanager
def host_session(engine: ForgeEngine, token: str) -> Iterator[None]:
    """Each database gets its previous entry for ``token`` back (None: unregistered), also after an error."""
    previous = [(db, db.word_embeddings.get(token)) for db in engine.databases()]
    try:
        yield
    finally:
        engine.release()
        if engine.live is not None:
            for db, entry in previous:
                db.register_embedding_by_name(entry, token)
            engine.live = None
        reset_conditioning_cache()
        from backend import memory_management

        memory_management.soft_empty_cache()


# ---------------------------------------------------------------------- self-check
def self_check(engine: ForgeEngine, init_text: str = "a photo", prompt: str = "a {} on a table",
               size: tuple[int, int] = (512, 512), weights: bool = False) -> dict:
    """Verify the adapter in the running Forge, on the loaded checkpoint:

    * with the vectors equal to the init text's token embeddings, our conditioning (with grad) for a prompt with
      the token equals Forge's own generation conditioning (its inference-mode ``get_learned_conditioning``) for
      the prompt with the init text;
    * a loss on it sends a gradient to the vectors of every text encoder;
    * with ``weights``, a digest of the UNet's, text encoders' and VAE's weights (equal before and after a run:
      the run left them bit-identical).
    """
    token = "tiselfcheck"
    first = engine.text_engines[engine.keys[0]]
    tokens = max(1, len(first.tokenizer(init_text, add_special_tokens=False)["input_ids"][:75]))
    vectors = {k: v.to(engine.device).requires_grad_(True) for k, v in engine.init_vectors(init_text, tokens).items()}
    with host_session(engine, token), engine.frozen():
        ours = engine.encode_prompts([prompt.format(token)], token, vectors, size)
        host = conditioning(engine.model, [prompt.format(init_text)], size, with_grad=False)
        diffs = {name: float((a.detach().float() - b.float()).abs().max()) for name, a, b in _pairs(ours, host)}
        probe_loss([a for _, a, _ in _pairs(ours, host)]).backward()
    grads = {k: float(v.grad.norm()) if v.grad is not None else 0.0 for k, v in vectors.items()}
    ok = all(d < 1e-4 for d in diffs.values()) and all(g > 0 for g in grads.values())
    info = getattr(engine.model, "sd_checkpoint_info", None)
    return {"ok": ok, "family": engine.family, "checkpoint": getattr(info, "name", ""),
            "widths": engine.encoder_widths, "vectors": tokens, "max_abs_diff": diffs, "grad_norm": grads,
            "prediction_type": engine.prediction_type, "replaced_inference_tensors": engine.replaced,
            **({"weights_digest": weights_digest([*engine.modules(), engine.vae.first_stage_model])}
               if weights else {})}


def probe_loss(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A loss with a gradient everywhere: a fixed random projection. (A sum of squares would not do: Forge's SD1
    conditioning ends in a LayerNorm, whose outputs' squares sum to a constant, so its gradient is exactly zero.)"""
    generator = torch.Generator().manual_seed(0)
    terms = [(t.float() * torch.randn(t.shape, generator=generator).to(t.device)).sum() for t in tensors]
    return torch.stack(terms).sum()


__all__ = ["HOST", "ForgeHost", "refusal"]
