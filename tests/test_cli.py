"""The command line as a user runs it: real files, exit codes and output; the journeys in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lib_ti.bench.speed import draw_images
from lib_ti.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def fresh_cli(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lib_ti", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_documents_every_config_option(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in out, f.name
    assert "--resume" in out and "--config" in out and "--data" in out
    assert "speed" in cli("bench", "--help")[1]


@pytest.mark.slow
def test_train_then_inspect_then_resume_further(tiny_model, tmp_path):
    model = tiny_model("sd1")
    data = draw_images(tmp_path / "imgs", 3, 64)
    run = tmp_path / "run"
    common = [
        "--model",
        model,
        "--data",
        data,
        "--name",
        "cli-tok",
        "--output-dir",
        run,
        "--width",
        "64",
        "--height",
        "64",
        "--save-every",
        "2",
        "--preview-every",
        "0",
        "--init-text",
        "a dog",
        "--num-vectors",
        "2",
    ]
    train = fresh_cli("train", *common, "--steps", "4")
    assert "finished at step 4" in train.stdout
    emb = run / "cli-tok.safetensors"
    assert emb.is_file() and (run / "loss.csv").is_file() and (run / "config.yaml").is_file()

    shown = json.loads(fresh_cli("inspect", emb, "--json").stdout)
    assert shown["num_vectors"] == 2 and shown["step"] == 4 and shown["widths"] == {"clip_l": 32}

    converted = tmp_path / "cli-tok.pt"
    fresh_cli("inspect", emb, "--to", converted)
    assert "string_to_param" in fresh_cli("inspect", converted).stdout

    again = fresh_cli("train", *common, "--steps", "4", check=False)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    more = fresh_cli("train", *common, "--steps", "6", "--resume")
    assert "finished at step 6" in more.stdout
    assert "resumed with steps: 4 -> 6" in more.stderr  # said at the start of the run

    other_seed = fresh_cli("train", *common, "--steps", "8", "--seed", "5", "--resume", check=False)
    assert other_seed.returncode == 2 and "seed: run 0, given 5" in other_seed.stderr
    assert TrainConfig.load(run / "config.yaml").seed == 0  # the refused resume rewrote nothing
    # Resuming needs only where the run is: its data, size and template come from the run itself.
    short = fresh_cli("train", "--model", model, "--output-dir", run, "--name", "cli-tok", "--steps", "8", "--resume")
    assert "finished at step 8" in short.stdout
    assert TrainConfig.load(run / "config.yaml").width == 64


@pytest.mark.slow
def test_config_file_with_flag_overrides(tiny_model, tmp_path):
    data = draw_images(tmp_path / "imgs", 2, 64)
    cfg = TrainConfig(name="from-file", model=str(tiny_model("sd1")), data_dir=str(data), width=64, height=64,
                      steps=50, output_dir=str(tmp_path / "run"), save_every=0, preview_every=0)
    cfg.save(tmp_path / "run.yaml")
    out = fresh_cli("train", "--config", tmp_path / "run.yaml", "--steps", "2").stdout
    assert "finished at step 2" in out
    assert TrainConfig.load(tmp_path / "run" / "config.yaml").steps == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model", "--data", "."], "model='/nonexistent/model'"),
        (["--data", "/nonexistent/data", "--model", "."], "data_dir='/nonexistent/data'"),
        (["--model", ".", "--data", ".", "--learning-rate", "0.05:abc"], "'abc'"),
        (["--model", ".", "--data", ".", "--name", "a/b"], "name='a/b'"),
        (["--model", ".", "--data", "tests", "--template", "nosuch"], "nosuch"),
    ],
)
def test_bad_input_is_one_clear_line_before_any_model_work(cli, args, message, monkeypatch):
    monkeypatch.chdir(ROOT)  # the relative paths above
    code, _, err = cli("train", *args)
    assert code == 2
    assert err.startswith("[TI Trainer] ") and message in err
    assert "Traceback" not in err and "loading" not in err


def test_empty_data_folder_is_reported_before_loading_the_model(cli, tmp_path):
    (tmp_path / "data").mkdir()
    code, _, err = cli("train", "--model", tmp_path, "--data", tmp_path / "data")
    assert code == 2 and "no image" in err.lower() and "loading" not in err
