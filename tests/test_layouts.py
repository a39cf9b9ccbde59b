"""Conv inputs made contiguous during a webui run on a CPU (issue 15): the host's channels-last views made
torch copy each big conv weight per forward and backward."""

from __future__ import annotations

import torch
from torch.profiler import profile

from lib_ti.layouts import contiguous_conv_inputs


def _weight_copies(conv: torch.nn.Conv2d, x: torch.Tensor) -> int:
    """How many weight-sized aten::copy_ calls a forward and backward of ``conv`` on ``x`` makes."""
    with profile(record_shapes=True) as p:
        conv(x).sum().backward()
    return sum(e.count for e in p.key_averages(group_by_input_shape=True)
               if e.key == "aten::copy_" and e.input_shapes and list(e.input_shapes[0]) == list(conv.weight.shape))


def test_channels_last_input_costs_weight_copies_and_the_hook_removes_them():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 256, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    reference = conv(x.detach().contiguous())
    assert _weight_copies(conv, x) >= 1  # the cost being avoided (torch's CPU conv reorders the weight)
    with contiguous_conv_inputs([torch.nn.Sequential(conv)]) as hooked:
        assert hooked == 1
        assert _weight_copies(conv, x) == 0
        torch.testing.assert_close(conv(x), reference)
    assert not conv._forward_pre_hooks  # put back after the block


def test_inputs_larger_than_the_weight_are_left_as_they_are():
    conv = torch.nn.Conv2d(4, 4, 1)
    x = torch.randn(1, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    with contiguous_conv_inputs([conv]):
        conv(x)
    assert seen == [False]  # copying the activation would cost more than the weight copy it saves
