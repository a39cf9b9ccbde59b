"""Checkpoint scoring (``python -m lib_ti score``) with a tiny random CLIP built here, on the micro model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_ti.errors import TIError
from lib_ti.micro import assets
from lib_ti.scoring.clip import load_clip, prepare_image
from lib_ti.scoring.score import CheckpointScore, ScoreOptions, edit_text, list_checkpoints, recommend, run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A CLIPModel with random weights (2 layers, 32 wide, 32px images) and the real CLIP vocabulary's tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config={**layers, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(assets.model_folder() / "tokenizer").save_pretrained(folder)
    return folder


def test_tiny_clip_gives_unit_features_and_prepares_images_like_clip(tiny_clip):
    clip = load_clip(str(tiny_clip))
    images = [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (20, 90), (0, 0, 255))]
    feats, texts = clip.image_features(images), clip.text_features(["a red shape", "a blue shape on a background"])
    assert feats.shape == (2, 16) and texts.shape == (2, 16)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2)) and torch.allclose(texts.norm(dim=1), torch.ones(2))
    assert not torch.allclose(feats[0], feats[1])
    red = prepare_image(images[0], 32)  # short side to 32, centre crop, CLIP's mean and std
    assert red.shape == (3, 32, 32) and torch.allclose(red[0], torch.full((32, 32), (1 - 0.48145466) / 0.26862954))


def test_missing_clip_says_how_to_get_one(tmp_path):
    with pytest.raises(TIError, match=r"no CLIP model 'nobody/no-such-clip'.*hf download openai/clip-vit-base-patch32"):
        load_clip("nobody/no-such-clip")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TIError, match="is a file"):
        load_clip(str(tmp_path / "file"))
    with pytest.raises(TIError, match="could not be loaded"):
        load_clip(str(tmp_path))  # a folder without a model


def test_recommendation_balances_fidelity_and_editability():
    rows = [CheckpointScore(100, "a", 0.50, 0.30), CheckpointScore(200, "b", 0.70, 0.28),
            CheckpointScore(300, "c", 0.72, 0.20), CheckpointScore(400, "d", 0.72, 0.20)]
    assert recommend(rows) == 200  # 0.91 + 0.8: near the best of both; 300 has fidelity but lost editability
    assert [round(r.balance, 2) for r in rows] == [1.0, 1.71, 1.0, 1.0]
    same = [CheckpointScore(5, "a", 0.5, 0.5), CheckpointScore(10, "b", 0.5, 0.5)]
    assert recommend(same) == 5  # a tie goes to the earlier step
    assert edit_text("a photo of a [name] on the beach") == "a photo of a on the beach"


def test_bad_options_and_folders_are_refused_before_any_model_work(tmp_path):
    with pytest.raises(TIError, match="has no \\[name\\]"):
        ScoreOptions(str(tmp_path), prompts=("a beach",))
    with pytest.raises(TIError, match="seeds=0"):
        ScoreOptions(str(tmp_path), seeds=0)
    with pytest.raises(TIError, match="not a training run folder"):
        run_config(tmp_path)
    with pytest.raises(TIError, match="no checkpoints of 'tok'"):
        list_checkpoints(tmp_path, "tok")


@pytest.mark.slow
def test_score_command_ranks_every_checkpoint_of_a_micro_run(tiny_clip, tmp_path):
    from lib_ti.micro.quality import QualityConfig, write_concept_images

    data = write_concept_images(QualityConfig(num_images=2), tmp_path / "images")
    run = tmp_path / "run"
    train = [sys.executable, "-m", "lib_ti", "train", "--model", str(assets.model_folder()), "--data", str(data),
             "--name", "my-tri", "--init-text", "shape", "--width", "64", "--height", "64", "--steps", "4",
             "--save-every", "2", "--keep-last", "0", "--preview-every", "0", "--preview-steps", "2",
             "--output-dir", str(run)]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "template auto: all 2 images have a caption naming [name]" in proc.stderr  # the run said what it used
    score = [sys.executable, "-m", "lib_ti", "score", "--run", str(run), "--clip", str(tiny_clip), "--seeds", "2",
             "--prompt", "a [name] in yellow on a black background", "--prompt", "a green [name] on a white "
             "background", "--device", "cpu"]
    proc = subprocess.run(score, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "scores" / "scores.json").read_text())
    assert [r["step"] for r in report["rows"]] == [2, 4] and report["recommended"] in (2, 4)
    # the preview prompt: the first training prompt, here image 0's caption with the name
    assert report["training_images"] == 2 and "my-tri on a" in report["fidelity_prompt"]
    for row in report["rows"]:
        assert -1 <= row["fidelity"] <= 1 and -1 <= row["editability"] <= 1 and Path(row["path"]).is_file()
    assert "<- recommended" in proc.stdout and f"recommended   step {report['recommended']}" in proc.stdout
    grid = Image.open(run / "scores" / "grid.png")
    assert grid.size[1] >= 2 * 128 and grid.size[0] >= 3 * 128  # 2 checkpoints x (preview prompt + 2 prompts)
    missing = subprocess.run([sys.executable, "-m", "lib_ti", "score", "--run", str(run), "--clip",
                              str(tmp_path / "no-clip")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "hf download" in missing.stderr and "Traceback" not in missing.stderr


def test_clip_loads_where_diffusers_is_not_installed(tiny_clip, monkeypatch):
    """The webui has transformers but no diffusers: scoring in the tab loads CLIP with transformers alone."""
    import sys

    for module in ("diffusers", "diffusers.utils", "diffusers.utils.logging"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    clip = load_clip(str(tiny_clip))
    assert clip.text_features(["a red shape"]).shape == (1, 16)
