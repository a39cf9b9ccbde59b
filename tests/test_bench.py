"""``bench speed`` and ``bench suite``: the figures, the built-in reproduction, the suite's budget and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib_ti.bench import suite
from lib_ti.bench.speed import BuiltinStep, SpeedSettings
from lib_ti.engines.standalone import StandaloneEngine
from lib_ti.errors import TIError


@pytest.mark.parametrize(("change", "message"), [
    ({"weights": "fp8"}, "bench --weights 'fp8' is unknown"),
    ({"compile": "fast"}, "bench --compile 'fast' is unknown"),
    ({"reproduce": "kohya"}, "bench --reproduce 'kohya' is unknown"),
    ({"steps": 0}, "--steps >= 1"),
])
def test_bad_speed_settings_are_refused(change, message):
    with pytest.raises(TIError, match=message):
        SpeedSettings(**change)


def test_bench_speed_reports_every_figure(tmp_path, cli):
    out = tmp_path / "speed.json"
    code, text, err = cli("bench", "speed", "--arch", "tiny-sd1", "--resolution", "64", "--steps", "3", "--warmup",
                          "1", "--device", "cpu", "--json", out)
    assert code == 0, err
    figures = json.loads(out.read_text())
    assert figures["timed_steps"] == 3 and figures["steps_per_s_median"] > 0 and figures["peak_rss_gb"] > 0
    assert figures["time_to_first_step_s"] >= figures["model_load_s"] > 0
    assert "steps/s median" in text and "peak RSS" in text


def test_the_builtin_reproduction_computes_unet_weight_grads_and_ours_does_not(tiny_model):
    engine = StandaloneEngine.load(tiny_model("sd1"))
    weight = next(engine.unet.parameters())
    as_loaded = weight.requires_grad
    for wrapped, expect_grad in ((engine, False), (BuiltinStep(engine), True)):
        with wrapped.frozen():
            assert weight.requires_grad is expect_grad
            noisy = torch.randn(1, 4, 8, 8)
            vectors = {k: v.requires_grad_(True) for k, v in engine.init_vectors("photo", 1).items()}
            cond = engine.encode_prompts(["a photo of tok"], "tok", vectors, (64, 64))
            engine.predict(noisy, torch.tensor([10]), cond).float().pow(2).mean().backward()
        assert (weight.grad is not None) is expect_grad
        assert weight.requires_grad is as_loaded  # the model is left as it was loaded
    assert BuiltinStep(engine).family == engine.family  # everything else is the engine's own


def _fake_run_one(figures_for):
    def run_one(settings, json_path, timeout):
        return figures_for(settings, timeout)
    return run_one


def _figures(images_per_s: float) -> dict:
    return {"steps_per_s_median": images_per_s, "images_per_s": images_per_s, "peak_allocated_gb": 2.5,
            "peak_reserved_gb": 3.0, "time_to_first_step_s": 12.0}


def test_the_suite_stops_starting_rows_when_the_budget_is_spent_and_keeps_each_rows_error(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(suite.time, "monotonic", lambda: clock[0])
    rows = [SpeedSettings(arch="sd15", resolution=512, precision="bf16", batch_size=b) for b in (1, 4, 8)]

    timeouts = []

    def figures_for(settings, timeout):
        timeouts.append(timeout)
        clock[0] += 50.0  # each row takes 50 s
        if settings.batch_size == 4:
            return None, "torch.OutOfMemoryError: CUDA out of memory"
        return _figures(10.0), ""

    results = suite.run_suite(rows, tmp_path, budget_s=110, row_timeout_s=80, run_one=_fake_run_one(figures_for))
    assert timeouts == [80, 60]  # a row's own limit, then what is left of the budget
    assert [r.figures is not None for r in results] == [True, False, False]
    assert results[1].error.startswith("torch.OutOfMemoryError")
    assert results[2].error == "not run: the time budget was spent"  # 10 s left: no model build fits


def test_useful_mfu_uses_the_ideal_flops_and_the_measured_peak():
    row = suite.Row(SpeedSettings(arch="sd15", resolution=512, precision="bf16", batch_size=4), _figures(100.0))
    assert suite.useful_mfu(row, {"bf16": 680.0}) == pytest.approx(100.0 * 1.70 / 680.0)
    assert suite.useful_mfu(row, {"fp16": 680.0}) is None  # no peak measured for its dtype
    tiny = suite.Row(SpeedSettings(arch="tiny-sd1", resolution=64), _figures(5.0))
    assert suite.useful_mfu(tiny, {"auto": 1.0}) is None  # no ideal FLOPs for a tiny model
    table = suite.format_table([row, suite.Row(row.settings, None, "not run: the time budget was spent")],
                               {"bf16": 680.0})
    assert "| sd15 512px b4 bf16 | 100.00 | 100.00 | 25.0% | 2.50 alloc / 3.00 reserved | 12.0 | |" in table
    assert "| sd15 512px b4 bf16 | | | | | | not run: the time budget was spent |" in table
    assert "bf16 680" in table


def test_every_gpu_row_is_valid_and_distinct():
    rows = suite.PRESETS["gpu"]()
    assert len({suite.Row(r).label for r in rows}) == len(rows)
    assert {r.arch for r in rows} == {"sd15", "sdxl"} and any(r.reproduce == "builtin" for r in rows)
    assert all((r.arch, r.resolution) in suite.IDEAL_TFLOP for r in rows)


def test_only_names_rows_of_the_preset(tmp_path):
    with pytest.raises(TIError, match="--only 99 is not a row of preset 'cpu'"):
        suite.run("cpu", tmp_path, budget_s=10, only=[99])
    with pytest.raises(TIError, match="--preset 'tpu' is unknown"):
        suite.run("tpu", tmp_path, budget_s=10)


@pytest.mark.slow
def test_the_cpu_suite_runs_a_row_in_a_process_of_its_own_and_writes_the_table(tmp_path, cli):
    code, text, err = cli("bench", "suite", "--preset", "cpu", "--only", "1", "5", "--out", tmp_path, "--budget", "600")
    assert code == 0, err
    assert "| tiny-sd1 64px b1 fp32 |" in text and "| tiny-sd1 64px b1 fp32 built-in reproduction |" in text
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert [r["error"] for r in saved["rows"]] == ["", ""] and saved["peaks_tflops"]["fp32"] > 0
    assert saved["rows"][1]["figures"]["reproduce"] == "builtin"
    assert saved["rows"][1]["figures"]["gradient_checkpointing"] is True
    assert Path(tmp_path / "suite.md").read_text().strip() == text.strip()
