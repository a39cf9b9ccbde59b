"""``bench speed --limits``: the step's matrix products counted by shape, and the device's floors for them."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib_ti.bench.limits import Gemm, GemmCounter, floors, format_limits
from lib_ti.bench.speed import SpeedSettings
from lib_ti.errors import TIError

MODULES = {
    "conv 3x3": lambda: torch.nn.Conv2d(8, 16, 3, padding=1),
    "conv 3x3 stride 2": lambda: torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
    "conv 1x1": lambda: torch.nn.Conv2d(8, 16, 1),
    "transposed conv": lambda: torch.nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1),
    "linear": lambda: torch.nn.Linear(8, 16),
}


@pytest.mark.parametrize("weight_grads", [False, True], ids=["frozen", "weight grads"])
@pytest.mark.parametrize("name", MODULES)
def test_the_counter_agrees_with_torchs_flop_counter(name, weight_grads):
    torch.manual_seed(0)
    module = MODULES[name]().requires_grad_(weight_grads)
    x = torch.randn(3, 5, 8) if name == "linear" else torch.randn(2, 8, 6, 6)
    x.requires_grad_(True)
    with FlopCounterMode(display=False) as reference:
        module(x).sum().backward()
    with GemmCounter() as counter:
        module(x).sum().backward()
    assert counter.flops == reference.get_total_flops() > 0


def test_a_grouped_convolutions_gemms_are_per_group():
    conv = torch.nn.Conv2d(8, 16, 3, groups=2)  # per group: 4 inputs x 9 -> 8 outputs; 4x4 outputs x 2 images
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with GemmCounter() as counter:
        conv(x).sum().backward()
    assert counter.counts == collections.Counter({
        Gemm(2, 32, 36, 8, torch.float32): 1,  # forward: pixels x (inputs x kernel) x outputs
        Gemm(2, 32, 8, 36, torch.float32): 1,  # the input's grad
        Gemm(2, 8, 32, 36, torch.float32): 1,  # the weight's grad
    })


def test_cpu_attention_is_counted_forward_and_backward():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)  # 2 heads, 16 queries, 8 dims
    k = torch.randn(1, 2, 7, 8, requires_grad=True)  # 7 keys (cross-attention)
    with FlopCounterMode(display=False) as reference:
        torch.nn.functional.scaled_dot_product_attention(q, k, k).sum().backward()
    with GemmCounter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, k).sum().backward()
    # forward QK^T and PV; backward: QK^T again, dP, dV, dQ, dK (torch's own counter misses the CPU kernels)
    assert sum(counter.counts.values()) == 7
    assert counter.flops == 7 * 2 * 2 * 16 * 8 * 7 and counter.flops > reference.get_total_flops()


def test_floors_add_up_by_shape():
    counts = collections.Counter({Gemm(1, 16, 256, 256, torch.float32): 3, Gemm(1, 256, 256, 256, torch.float32): 1})
    lim = floors(counts, torch.device("cpu"), peak_tflops=0.1)
    total = 3 * 2 * 16 * 256 * 256 + 2 * 256**3
    assert lim["step_gflop"] == pytest.approx(total / 1e9)
    assert lim["floor_peak_s"] == pytest.approx(total / 0.1e12)
    assert set(lim["by_rows"]) == {16, 256}
    assert lim["floor_shapes_s"] > 0
    assert sum(r["floor_s"] for r in lim["by_rows"].values()) == pytest.approx(lim["floor_shapes_s"])
    assert lim["by_rows"][16]["gflop"] == pytest.approx(3 * 2 * 16 * 256 * 256 / 1e9)
    lines = format_limits(lim, step_s=lim["floor_shapes_s"] * 2)
    assert "(this run 50 %)" in lines[1] and "16 rows" in lines[2] and "where that floor goes" in lines[2]


def test_bench_speed_limits_counts_the_real_step(tmp_path, cli):
    out = tmp_path / "speed.json"
    code, text, err = cli("bench", "speed", "--arch", "tiny-sd1", "--resolution", "64", "--steps", "2", "--warmup",
                          "1", "--device", "cpu", "--limits", "--json", out)
    assert code == 0, err
    lim = json.loads(out.read_text())["limits"]
    rows = {int(m) for m in lim["by_rows"]}
    assert 64 in rows and 77 in rows  # the 8x8 latent's pixels, the prompt's tokens
    assert lim["step_gflop"] > 0 and lim["floor_shapes_s"] > 0 and lim["floor_peak_s"] > 0
    assert "square-matmul peak" in text and "own GEMM shapes" in text


def test_limits_are_refused_where_they_cannot_be_counted(cli):
    with pytest.raises(TIError, match="leave out --compile"):
        SpeedSettings(limits=True, compile="default")
    code, _, err = cli("bench", "speed", "--engine", "webui", "--limits")
    assert code != 0 and "--limits counts a headless step" in err
