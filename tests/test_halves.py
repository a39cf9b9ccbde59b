"""bf16 runs: frozen weights held in bfloat16 for the run and put back bit for bit (``lib_ti.halves``)."""

from __future__ import annotations

import pytest
import torch

from lib_ti import devices, halves
from lib_ti.config import TrainConfig
from lib_ti.errors import TIError
from lib_ti.halves import held_in_bf16, join_float32, split_float32, weights_digest
from lib_ti.trainer import train

needs_bf16 = pytest.mark.skipif(not devices.cpu_has_bf16(), reason="this CPU has no bfloat16 instructions")

# Patterns where a rounding split could lose a bit: NaNs (one with the largest payload, whose rounding
# carries past the exponent), infinities, -0.0, the smallest subnormal, exact ties and a carry into the exponent.
SPECIAL_BITS = [0x7FFFFFFF, -1, 0x7FFF8000, 0x7FFF7FFF, -(2**31), 0x00000001, 0x00008000, 0x3F808000, 0x3F818000,
                0x7F800000, -8388608, 0x3F7FFFFF, 0x7F7FFFFF]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("chunk", [3, halves.CHUNK])
def test_split_and_join_give_every_float32_pattern_back_exactly(chunk, monkeypatch):
    monkeypatch.setattr(halves, "CHUNK", chunk)  # chunk boundaries inside the tensor, and one chunk
    special = torch.tensor(SPECIAL_BITS, dtype=torch.int32).view(torch.float32)
    for t in (special, torch.randn(37, 11) * 100, torch.randn(5, 7).t()):
        high, low = split_float32(t)
        assert high.dtype == torch.bfloat16 and low.dtype == torch.int16 and high.shape == t.shape
        assert torch.equal(bits(join_float32(high, low)), bits(t))


def test_the_bfloat16_half_is_the_float32_rounded_to_within_one_bf16_step():
    t = torch.cat([torch.randn(100_000) * 10, torch.tensor(SPECIAL_BITS, dtype=torch.int32).view(torch.float32)])
    finite = torch.isfinite(t)
    high, _ = split_float32(t)
    ours = high[finite].view(torch.int16).int()
    torch_rounded = t[finite].to(torch.bfloat16).view(torch.int16).int()  # round to nearest even
    diff = (ours - torch_rounded).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) < 100  # only exact ties round the other way


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.tied = torch.nn.Linear(8, 8, bias=False)
        self.tied.weight = self.lin.weight  # one Parameter in two layers: converted and restored once
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.norm = torch.nn.LayerNorm(8)
        self.fp16 = torch.nn.Linear(4, 4).half()  # not float32: restored from the kept original
        self.register_buffer("table", torch.randn(3))


def test_held_weights_are_bf16_inside_and_bit_identical_after_also_after_an_error():
    net = Net()
    with torch.no_grad():
        net.lin.bias[0] = float("nan")
        net.conv.weight.view(-1)[0] = -0.0
    before = {k: bits(v).clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), held_in_bf16([net, net]) as count:  # a module twice: once
        assert count == 6  # lin's weight (tied: once) and bias, conv's and fp16's weight and bias
        assert {net.lin.weight.dtype, net.conv.bias.dtype, net.fp16.weight.dtype} == {torch.bfloat16}
        assert net.emb.weight.dtype == net.norm.weight.dtype == net.table.dtype == torch.float32
        assert net.tied.weight is net.lin.weight
        raise RuntimeError("boom")
    after = net.state_dict()
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in Net().state_dict().items()} | {
        "fp16.weight": torch.float16, "fp16.bias": torch.float16}
    for key, value in after.items():
        assert torch.equal(bits(value), before[key]), key
    assert net.tied.weight is net.lin.weight


@needs_bf16
def test_a_bf16_run_computes_in_bf16_and_leaves_every_model_weight_bit_identical(engines, images, tmp_path):
    engine = engines("sd1")  # loaded in float32
    modules = {"unet": engine.unet, "vae": engine.vae, **{e.key: e.model for e in engine.encoders}}
    before = {(m, k): bits(v).clone() for m, mod in modules.items() for k, v in mod.state_dict().items()}
    seen: list[torch.dtype] = []
    hook = engine.unet.conv_in.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
    cfg = TrainConfig(name="tok", init_text="a photo", num_vectors=2, data_dir=str(images), width=64, height=64,
                      output_dir=str(tmp_path / "run"), steps=3, batch_size=2, learning_rate="0.05", save_every=0,
                      preview_every=2, preview_steps=2, log_every=1, precision="bf16")
    events: list = []
    try:
        result = train(engine, cfg, on_event=events.append)
    finally:
        hook.remove()
    assert result.steps_done == 3 and result.last_loss is not None and result.last_loss == result.last_loss
    assert seen and set(seen) == {torch.bfloat16}  # the steps (and the preview) ran on bf16 weights
    assert any(type(e).__name__ == "Preview" for e in events)  # a preview renders under the run's autocast
    for m, mod in modules.items():
        for key, value in mod.state_dict().items():
            assert value.dtype == torch.float32, (m, key)
            assert torch.equal(bits(value), before[(m, key)]), (m, key)


def test_bf16_is_refused_before_any_work_where_the_cpu_lacks_it(engines, images, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    cfg = TrainConfig(name="tok", data_dir=str(images), width=64, height=64, output_dir=str(tmp_path / "run"),
                      steps=2, precision="bf16")
    with pytest.raises(TIError, match="precision bf16: this CPU has no bfloat16 instructions.*use precision fp32"):
        train(engines("sd1"), cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder or the latents were made


def test_the_weights_digest_sees_a_single_bit_and_not_a_held_run():
    net = Net()
    before = weights_digest([net])
    with held_in_bf16([net]):
        assert weights_digest([net]) != before  # the held weights are other tensors
    assert weights_digest([net]) == before
    with torch.no_grad():
        net.norm.weight.view(torch.int32)[3] ^= 1  # the lowest mantissa bit of one value
    assert weights_digest([net]) != before
