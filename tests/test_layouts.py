"""Conv layouts of a run on a CPU (issue 15): float32 runs hold the convs channels-last, bf16 runs keep
them NCHW with NCHW inputs; neither reorders a weight per pass, and the weights come back bit-identical.
Convs with small outputs run torch's im2col kernel."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from lib_ti import devices
from lib_ti.layouts import SMALL_CONV_ROWS, channels_last_convs, contiguous_conv_inputs, native_small_convs


def _weight_copies(conv: torch.nn.Conv2d, x: torch.Tensor) -> int:
    """How many weight-sized aten::copy_ calls a forward and backward of ``conv`` on ``x`` makes."""
    with profile(record_shapes=True) as p:
        conv(x).sum().backward()
    return sum(e.count for e in p.key_averages(group_by_input_shape=True)
               if e.key == "aten::copy_" and e.input_shapes and list(e.input_shapes[0]) == list(conv.weight.shape))


def _conv() -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(256, 256, 3, padding=1).requires_grad_(False)


def test_the_hosts_channels_last_activations_cost_no_weight_copy_inside_the_block():
    conv = _conv()
    x = torch.randn(1, 256, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    reference = conv(x.detach().contiguous())
    assert _weight_copies(conv, x) >= 1  # the cost being avoided (torch's CPU conv reorders an NCHW weight)
    with channels_last_convs([torch.nn.Sequential(conv)]) as hooked:
        assert hooked == 1
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert _weight_copies(conv, x) == 0
        assert _weight_copies(conv, x.detach().contiguous().requires_grad_(True)) == 0  # headless: NCHW in
        torch.testing.assert_close(conv(x), reference)
    assert not conv._forward_pre_hooks


def test_weights_come_back_bit_identical_in_their_own_layout_also_after_an_error():
    net = torch.nn.Sequential(_conv(), torch.nn.Conv2d(256, 8, 1))
    before = [(p, p.detach().clone(), p.stride()) for p in net.parameters()]
    with pytest.raises(RuntimeError, match="boom"), channels_last_convs([net, net[0]]) as hooked:
        assert hooked == 2  # each conv once, though named twice
        net(torch.randn(1, 256, 4, 4))
        raise RuntimeError("boom")
    for (param, bits, stride), now in zip(before, net.parameters(), strict=True):
        assert now is param  # the same Parameter objects the host's model holds
        assert now.stride() == stride and now.is_contiguous()
        assert torch.equal(now.detach().reshape(-1).view(torch.int32), bits.reshape(-1).view(torch.int32))
    assert not any(m._forward_pre_hooks for m in net)


def test_a_cpu_run_trains_with_channels_last_convs_and_profiles_no_layout_mismatch(engines, images, tmp_path,
                                                                                    monkeypatch):
    from lib_ti.config import TrainConfig
    from lib_ti.trainer import train

    engine = engines("sd1")
    before = {k: v.detach().clone() for k, v in engine.unet.state_dict().items()}
    seen: list[bool] = []
    hook = engine.unet.conv_in.register_forward_hook(  # channels-last, and the small-conv kernel's hook in place
        lambda mod, args, _out: seen.append(mod.weight.is_contiguous(memory_format=torch.channels_last)
                                            and "_conv_forward" in mod.__dict__))
    monkeypatch.setenv("TI_TRAINER_PROFILE", "2")
    cfg = TrainConfig(name="tok", init_text="a photo", data_dir=str(images), width=64, height=64,
                      output_dir=str(tmp_path / "run"), steps=4, save_every=0, preview_every=0)
    try:
        train(engine, cfg)
    finally:
        hook.remove()
    assert seen and all(seen)  # every step's convs ran on channels-last weights
    report = (tmp_path / "run" / "profile.txt").read_text()
    assert "conv inputs in another layout than their weight: 0 of" in report
    assert "aten::_slow_conv2d_forward" in report  # the tiny model's 8x8 latents: every conv is a small one
    assert not any("_conv_forward" in m.__dict__ for m in engine.unet.modules())
    for key, value in engine.unet.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, before[key]), key


def test_inside_a_bf16_hold_the_layout_change_still_restores_every_bit():
    from lib_ti.halves import held_in_bf16

    net = torch.nn.Sequential(_conv(), torch.nn.Conv2d(256, 8, 1))
    before = [p.detach().clone() for p in net.parameters()]
    with held_in_bf16([net]), channels_last_convs([net]):
        assert net[0].weight.dtype == torch.bfloat16
        assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
        net(torch.randn(1, 256, 4, 4, dtype=torch.bfloat16))
    for now, bits in zip(net.parameters(), before, strict=True):
        assert now.dtype == torch.float32 and now.is_contiguous()
        assert torch.equal(now.detach().reshape(-1).view(torch.int32), bits.reshape(-1).view(torch.int32))


def test_nchw_weights_get_contiguous_inputs_instead_of_reordering_the_weight():
    conv = _conv()
    x = torch.randn(1, 256, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    reference = conv(x.detach().contiguous())
    with contiguous_conv_inputs([torch.nn.Sequential(conv)]) as hooked:
        assert hooked == 1
        assert _weight_copies(conv, x) == 0
        torch.testing.assert_close(conv(x), reference)
    assert not conv._forward_pre_hooks


def test_inputs_larger_than_the_weight_are_left_as_they_are():
    conv = torch.nn.Conv2d(4, 4, 1)
    x = torch.randn(1, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    with contiguous_conv_inputs([conv]):
        conv(x)
    assert seen == [False]  # copying the activation would cost more than the weight copy it saves


@pytest.mark.skipif(not devices.cpu_has_bf16(), reason="this CPU has no bfloat16 instructions")
def test_a_bf16_run_keeps_nchw_convs(engines, images, tmp_path):
    from lib_ti.config import TrainConfig
    from lib_ti.trainer import train

    engine = engines("sd1")
    seen: list[bool] = []
    hook = engine.unet.conv_in.register_forward_hook(lambda mod, args, _out: seen.append(mod.weight.is_contiguous()))
    cfg = TrainConfig(name="tok", init_text="a photo", data_dir=str(images), width=64, height=64,
                      output_dir=str(tmp_path / "run"), steps=2, save_every=0, preview_every=0, precision="bf16")
    try:
        train(engine, cfg)
    finally:
        hook.remove()
    assert seen and all(seen)  # bf16's channels-last path is the slower one on a CPU


def _kernels(conv: torch.nn.Module, x: torch.Tensor) -> set[str]:
    """The aten convolution kernels a forward and backward of ``conv`` on ``x`` runs."""
    with profile() as p:
        conv(x).sum().backward()
    return {e.key for e in p.key_averages() if e.key in KERNELS}


KERNELS = ("aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::mkldnn_convolution")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2048, 3, 1, 1, 4), (2048, 3, 2, 1, 8), (2048, 1, 1, 0, 4)],
                         ids=["3x3", "3x3 stride 2", "1x1"])
def test_small_convs_run_torchs_im2col_kernel_with_the_same_output_and_grads(shape, layout):
    channels, kernel, stride, padding, size = shape
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 64, kernel, stride=stride, padding=padding).requires_grad_(False)
    x = torch.randn(1, channels, size, size)
    if layout == "channels_last":  # as a float32 run holds them (``channels_last_convs``)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    reference = conv(x)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)
    if kernel > 1:  # torch's own pick for 3x3s with inputs of > 20480 values (for a 1x1 it varies with the threads)
        assert "aten::mkldnn_convolution" in _kernels(conv, x)
    with native_small_convs([torch.nn.Sequential(conv)]) as hooked:
        assert hooked == 1
        out = conv(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert _kernels(conv, x) == {"aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, reference_grad)
    assert "_conv_forward" not in conv.__dict__


def test_larger_outputs_and_other_convs_keep_the_forward_they_had_which_comes_back_afterwards():
    calls: list[torch.nn.Conv2d] = []
    convs = [torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
             torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2),
             torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")]
    for conv in convs:
        original = conv._conv_forward
        conv._conv_forward = lambda x, w, b, original=original, conv=conv: (calls.append(conv), original(x, w, b))[1]
    recorder = convs[0]._conv_forward
    big = torch.randn(1, 8, 9, 9)  # 81 output rows
    assert 81 > SMALL_CONV_ROWS
    with native_small_convs(convs):
        convs[0](big)
        convs[0](torch.randn(1, 8, 4, 4))  # small: torch's im2col kernel, not the recorder
        for conv in convs[1:]:
            conv(torch.randn(1, 8, 4, 4))
    assert calls == convs  # the big input and every conv that is not a plain one went the usual way
    assert convs[0]._conv_forward is recorder


def test_the_weight_a_host_forward_hands_on_is_the_one_multiplied():
    class Patched(torch.nn.Conv2d):  # like the webui's Lora or Forge's casts: the weight changes before the product
        def forward(self, x):
            return self._conv_forward(x, self.weight * 2, self.bias)

    conv = Patched(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 4, 4)
    reference = conv(x)
    with native_small_convs([conv]):
        torch.testing.assert_close(conv(x), reference)


def test_the_limits_counter_counts_the_im2col_kernel_as_the_convolution():
    from lib_ti.bench.limits import GemmCounter

    conv = torch.nn.Conv2d(16, 32, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    with GemmCounter() as usual:
        conv(x).sum().backward()
    with native_small_convs([conv]), GemmCounter() as im2col:
        conv(x).sum().backward()
    assert im2col.counts == usual.counts and im2col.flops > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_under_autocast_the_small_conv_computes_in_autocasts_dtype_as_a_conv_does(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 16, 4, 4).to(dtype).requires_grad_(True)  # an activation autocast made; float32 weights
    with torch.autocast("cpu", dtype=dtype):
        reference = conv(x)
        with native_small_convs([conv]):
            out = conv(x)
            assert _kernels(conv, x) == {"aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
    assert out.dtype == reference.dtype == dtype
    torch.testing.assert_close(out, reference)
