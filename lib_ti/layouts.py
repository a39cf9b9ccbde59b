"""Conv inputs made contiguous where the host hands them over channels-last (issue 15).

The webui's ``sd_hijack_unet.spatial_transformer_forward`` drops ldm's ``.contiguous()`` after the
attention, so from the first transformer on every activation of the UNet is a channels-last view. On a
CPU, torch's convolution then reorders the whole *weight* to channels-last on every forward and every
backward (``weight.contiguous(channels_last)``): at batch 1 and small latents that is a 59 MB copy per
1280-channel 3x3 conv per pass, 44 % of a step. Copying the activation instead costs a fraction of that
wherever it is the smaller tensor, which is the only case this touches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _contiguous_input(layer: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the input as a contiguous tensor when it is not and is smaller than the weight
    the convolution would otherwise copy in its place."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    weight = getattr(layer, "weight", None)
    if x is None or weight is None or x.is_contiguous() or x.numel() >= weight.numel():
        return None
    return (x.contiguous(), *args[1:])


@contextlib.contextmanager
def contiguous_conv_inputs(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """Inside the block every 2-D conv of ``modules`` gets a contiguous input (see the module's doc);
    afterwards the hooks are gone. Yields how many convs are hooked."""
    handles = [layer.register_forward_pre_hook(_contiguous_input)
               for m in modules for layer in m.modules() if isinstance(layer, torch.nn.Conv2d)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
