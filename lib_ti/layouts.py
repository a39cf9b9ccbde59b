"""Memory layouts of the UNet's convolutions for a run on a CPU (issue 15).

Torch's CPU convolution works in the channels-last (NHWC) layout whenever its input or its weight is
channels-last, and otherwise in NCHW. Two things made the default layout slow there:

- in the webui, ``sd_hijack_unet.spatial_transformer_forward`` drops ldm's ``.contiguous()`` after the
  attention, so from the first transformer on every activation is a channels-last view while the weights
  are NCHW: the convolution then reorders the whole *weight* on every forward and every backward (a 59 MB
  copy per 1280-channel 3x3 conv per pass at batch 1, 44 % of a step);
- headless, everything is NCHW, and oneDNN's NCHW path is the slower one at the small latents of a run
  (SD1.5 at 128 px, 1 thread: 6.6-9.3 s per UNet forward and backward, 5.5-6.1 s channels-last).

So a float32 run holds every 2-D conv weight channels-last (same values, another order of the same
bytes) and makes every conv input channels-last (``channels_last_convs``); afterwards the weights are
put back in their own layout: the same Parameter objects with bit-identical values, which the webui's
model needs. In bfloat16 oneDNN's channels-last path is the slower one (SD1.5 at 128 px, 2 threads:
1.62-1.66 s/step against 1.22-1.33 NCHW), so a bf16 run keeps NCHW weights and makes the host's
channels-last inputs contiguous instead (``contiguous_conv_inputs``), which avoids the weight reorder too.

At the smallest latents of a run the oneDNN convolution is slow in both dtypes: it reorders the whole
weight into its blocked format on every pass, which at a 4x4 or 2x2 latent costs more than the product
itself (SD1.5's 2560->1280 3x3 conv at 4x4, forward and backward, 2 threads: 92 ms float32
channels-last, 51 ms bf16). Torch's own im2col convolution (``thnn_conv2d``) multiplies the weight as
it lies: 17 and 8 ms. So ``native_small_convs`` sends every conv whose output has at most
``SMALL_CONV_ROWS`` rows (batch x pixels) there; it picks the same kernel torch picks itself for small
float32 inputs, only by the output's size instead of the input's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator

import torch

from .heap import Trimmer

CHANNELS_LAST = torch.channels_last
# At batch x output pixels up to this, the im2col kernel beat oneDNN's (SD1.5's convs at 8x8 and below,
# batch 1; at batch 4 from 4x4): measured per shape, forward and backward, float32 and bf16, 2 threads.
SMALL_CONV_ROWS = 64


def _channels_last_input(_layer: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: a 4-D input in channels-last layout (a no-op when it already is)."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or x.dim() != 4 or x.is_contiguous(memory_format=CHANNELS_LAST):
        return None
    return (x.contiguous(memory_format=CHANNELS_LAST), *args[1:])


def conv_layers(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Conv2d]:
    """Every 2-D convolution of ``modules``, each once."""
    seen: dict[int, torch.nn.Conv2d] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                seen.setdefault(id(layer), layer)
    return list(seen.values())


@contextlib.contextmanager
def channels_last_convs(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """Inside the block every 2-D conv of ``modules`` has a channels-last weight and input; afterwards
    (also after an error) each weight is back in its own layout, bit-identical. Yields how many convs."""
    convs = conv_layers(modules)
    moved: list[torch.Tensor] = []
    handles = []
    try:
        trimmer = Trimmer()
        for layer in convs:
            weight = layer.weight
            if not weight.is_contiguous(memory_format=CHANNELS_LAST):
                weight.data = weight.data.contiguous(memory_format=CHANNELS_LAST)
                moved.append(weight)
                trimmer.freed(weight.data.nbytes)
            handles.append(layer.register_forward_pre_hook(_channels_last_input))
        trimmer.done()
        yield len(convs)
    finally:
        for handle in handles:
            handle.remove()
        trimmer = Trimmer()
        for weight in moved:
            weight.data = weight.data.contiguous()  # NCHW, as every weight not already channels-last was
            trimmer.freed(weight.data.nbytes)
        trimmer.done()


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
    """Inside the block every 2-D conv of ``modules`` gets a contiguous input where that is cheaper than
    the weight reorder a channels-last input causes; afterwards the hooks are gone. Yields how many convs."""
    handles = [layer.register_forward_pre_hook(_contiguous_input) for layer in conv_layers(modules)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def _small_conv_forward(layer: torch.nn.Conv2d, fallback: Callable, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``Conv2d._conv_forward`` for a run on a CPU: torch's im2col convolution where the output is small
    and the conv is a plain one (zero padding, no dilation, one group), ``fallback`` otherwise."""
    padding = layer.padding
    if not (x.device.type == "cpu" and x.dim() == 4 and layer.groups == 1 and layer.padding_mode == "zeros"
            and layer.dilation == (1, 1) and not isinstance(padding, str)
            and x.shape[0] * _out_pixels(x, layer.kernel_size, layer.stride, padding) <= SMALL_CONV_ROWS):
        return fallback(x, weight, bias)
    dtype = _cpu_autocast_dtype()
    if dtype is not None:  # autocast does not know this op: cast as it casts a conv
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if not x.dtype == weight.dtype == (weight.dtype if bias is None else bias.dtype):
        return fallback(x, weight, bias)
    return torch.ops.aten.thnn_conv2d(x, weight, layer.kernel_size, bias, layer.stride, padding)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast computes a conv in, None when it is off."""
    try:
        on = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4 (Forge pins one): no device argument
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_dtype("cpu") if on else None


def _out_pixels(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]) -> int:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)


@contextlib.contextmanager
def native_small_convs(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """Inside the block every 2-D conv of ``modules`` runs torch's im2col kernel for small outputs (see the
    module's docstring). The hook sits on ``_conv_forward``, below any host forward that patches or casts
    the weight first (the webui's Lora, Forge's casts), so what is multiplied is what the host would use.
    Afterwards each layer is as it was. Yields how many convs."""
    convs = conv_layers(modules)
    own = [(layer, layer.__dict__.get("_conv_forward")) for layer in convs]
    for layer in convs:
        layer._conv_forward = functools.partial(_small_conv_forward, layer, layer._conv_forward)  # type: ignore[method-assign]
    try:
        yield len(convs)
    finally:
        for layer, before in own:
            if before is None:
                del layer._conv_forward
            else:
                layer._conv_forward = before  # type: ignore[method-assign]
