"""The AUTOMATIC1111 webui (v1.10) as a training host: the model side of ``Host``.

The engine itself is ``a1111_engine.WebuiEngine``. Here: refusing where training cannot work,
putting back everything a run changed (requires_grad, the live embedding, checkpointing patches,
medvram hooks, the conditioning cache), registering saved files in the host's one global embedding
database, renders through its txt2img, and the self-check. What every webui shares (GPU queue,
settings, folders) is in ``gpu_queue``, ``settings`` and ``folders``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..engine import PreviewRequest
from ..errors import TIError
from ..fileio import load_torch
from ..halves import weights_digest
from .a1111_engine import WebuiEngine, model_family, render, reset_conditioning_cache
from .host import Host, LoadedModel, training_size
from .registry import loaded_sd_model


class A1111Host:
    """Implements ``hosts.host.Host`` on A1111's ldm/sgm model and its ``sd_hijack`` embedding database."""

    name = "AUTOMATIC1111"
    reason = ""
    engine_type: type[WebuiEngine] = WebuiEngine  # a host with A1111's model shell may bring its own engine

    def engine(self) -> WebuiEngine:
        """The engine on the loaded checkpoint; refuses, before any work, where training cannot work."""
        from modules import shared

        if shared.cmd_opts.lowvram:
            raise TIError("--lowvram moves each UNet block to the GPU only for its own forward pass, so a backward "
                          "pass cannot run: restart the webui with --medvram (or without either) to train")
        model = shared.sd_model
        if model is None or not hasattr(model, "cond_stage_model"):
            raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page")
        return self.engine_type(model)

    def session(self, engine, token: str):
        return host_session(engine, token)

    def register_file(self, path: Path) -> None:
        """Usable in prompts at once: no restart, no refresh button; its hash goes to "TI hashes"."""
        from modules import sd_hijack, shared
        from modules.textual_inversion.textual_inversion import create_embedding_from_data

        emb = create_embedding_from_data(_read_for_host(path), path.stem, filename=path.name, filepath=str(path))
        db = sd_hijack.model_hijack.embedding_db
        if db.expected_shape not in (-1, emb.shape):
            raise TIError(f"{path.name} has width {emb.shape}, the loaded checkpoint expects {db.expected_shape}")
        db.register_embedding(emb, shared.sd_model)
        reset_conditioning_cache()

    def loaded_embeddings(self) -> dict[str, str | None]:
        from modules import sd_hijack

        words = sd_hijack.model_hijack.embedding_db.word_embeddings
        return {name: getattr(words[name], "filename", None) for name in sorted(words)}

    def txt2img(self, request: PreviewRequest):
        """A render on the loaded checkpoint with the embeddings registered now (the comparison grid's cells)."""
        from modules import shared

        if shared.sd_model is None:
            raise TIError("no checkpoint is loaded: pick one in the checkpoint list at the top of the page")
        return render(shared.sd_model, request)

    def self_check(self, init_text: str = "a photo", prompt: str = "a {} on a table", weights: bool = False) -> dict:
        return self_check(self.engine(), init_text, prompt, weights=weights)

    def loaded_model(self) -> LoadedModel | None:
        model = loaded_sd_model()
        if model is None:
            return None
        latent = getattr(model, "image_size", 0)
        encoder = getattr(getattr(model, "first_stage_model", None), "encoder", None)
        levels = getattr(encoder, "num_resolutions", 4)
        family = model_family(model)
        return LoadedModel(family, training_size(family, getattr(model, "parameterization", "eps"),
                                                 latent if isinstance(latent, int) else 0,
                                                 levels if isinstance(levels, int) else 4))


HOST: Host = A1111Host()  # typed: mypy checks the adapter against the seam


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


def _read_for_host(path: Path) -> dict:
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    return load_torch(path)


# ---------------------------------------------------------------------- self-check
def self_check(engine: WebuiEngine, init_text: str = "a photo", prompt: str = "a {} on a table",
               size: tuple[int, int] = (512, 512), weights: bool = False) -> dict:
    """Verify the adapter in the running host, on the loaded checkpoint (used by tests and support):

    * with the vectors equal to the init text's token embeddings, our conditioning for a prompt
      with the token equals the host's own generation conditioning for the prompt with the init text;
    * a loss on that conditioning sends a gradient to the vectors of every text encoder;
    * with ``weights``, a digest of every weight of the loaded checkpoint: the same before and after a run
      shows that the run left the host's model bit-identical (bf16 runs convert it for their duration).
    """
    token = "tiselfcheck"
    tokens = len(engine.embedders[engine.keys[0]].encode_embedding_init_text(init_text, 75))
    vectors = {k: v.to(engine.device).requires_grad_(True) for k, v in engine.init_vectors(init_text, tokens).items()}
    with host_session(engine, token), engine.frozen():
        ours = engine.encode_prompts([prompt.format(token)], token, vectors, size)
        with torch.no_grad():
            host = _host_conditioning(engine, prompt.format(init_text), size)
        diffs = {name: float((a.detach().float() - b.float()).abs().max()) for name, a, b in _pairs(ours, host)}
        probe_loss(a for _, a, _ in _pairs(ours, host)).backward()
    grads = {k: float(v.grad.norm()) if v.grad is not None else 0.0 for k, v in vectors.items()}
    ok = all(d < 1e-4 for d in diffs.values()) and all(g > 0 for g in grads.values())
    info = getattr(engine.model, "sd_checkpoint_info", None)
    return {"ok": ok, "family": engine.family, "checkpoint": getattr(info, "name", ""),
            "widths": engine.encoder_widths, "vectors": tokens, "max_abs_diff": diffs, "grad_norm": grads,
            **({"weights_digest": weights_digest([engine.model])} if weights else {})}


def probe_loss(outputs) -> torch.Tensor:
    """A loss whose gradient cannot vanish by construction: each output against a fixed random direction.
    (The sum of squares cannot serve: after a final LayerNorm with unit weight and zero bias, as in a
    freshly initialised checkpoint, every row's sum of squares is the width whatever the input.)"""
    generator = torch.Generator().manual_seed(0)
    terms = [(a.float() * torch.randn(a.shape, generator=generator).to(a.device)).sum() for a in outputs]
    return torch.stack(terms).sum()


def _host_conditioning(engine: WebuiEngine, prompt: str, size: tuple[int, int]):
    if engine.family != "sdxl":
        return engine.model.cond_stage_model([prompt])
    from modules.prompt_parser import SdConditioning

    return engine.model.get_learned_conditioning(SdConditioning([prompt], width=size[1], height=size[0]))


def _pairs(ours, host) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(ours, dict):
        return [(k, ours[k], host[k]) for k in sorted(ours)]
    return [("cond", ours, host)]
