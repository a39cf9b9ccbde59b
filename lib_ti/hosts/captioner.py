"""Captioning for the TI Dataset tab: the webui's own BLIP interrogator, or a local transformers BLIP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..dataset.blip import load_blip
from ..dataset.caption import per_image
from ..errors import TIError


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
