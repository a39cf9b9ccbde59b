"""The shapes world's own CLIP (``lib_ti.micro.clip_pretrain``, shipped in ``lib_ti/assets/micro-clip``), and the
rank correlation ``bench quality --clip`` reports."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_ti.micro import clip_pretrain as cp
from lib_ti.micro import model as micro
from lib_ti.micro.quality import QualityConfig, clip_agreement, edit_texts, format_report, token_cases
from lib_ti.micro.shapes import Scene, random_scene
from lib_ti.scoring.clip import load_clip
from lib_ti.scoring.score import ranks, spearman

ROOT = Path(__file__).resolve().parents[1]


def test_spearman_on_known_inputs():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    # with a tie: the Pearson correlation of the ranks (1..5 against 1, 2, 3.5, 5, 3.5) is 8 / sqrt(95), not the
    # no-ties shortcut 1 - 6 sum(d^2) / (n (n^2 - 1)) = 0.825
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [0.5, 0.5, 0.5]) is None
    assert spearman([1], [2]) is None
    with pytest.raises(ValueError, match="3 values against 2"):
        spearman([1, 2, 3], [1, 2])


def test_world_tokenizer_splits_the_worlds_captions_as_the_micro_models_tokenizer(tmp_path):
    full = micro.tokenizer()
    small = cp.load_tokenizer(cp.world_tokenizer(tmp_path))
    assert len(small) < 1000  # of 49408
    rng = random.Random(0)
    for _ in range(200):
        text, _ = cp.clip_caption(random_scene(rng), rng, cp.ClipConfig())
        assert small.convert_ids_to_tokens(small(text).input_ids) == full.convert_ids_to_tokens(full(text).input_ids)


def test_a_caption_is_a_positive_for_every_image_it_describes():
    red_star = Scene("star", "red", "blue", 32, 32, 20)
    red_ring = Scene("ring", "red", "blue", 32, 32, 20)
    said = [cp.Said("star", "red", None), cp.Said(None, "red", "blue"), cp.Said("ring", None, None)]
    assert cp.positives([red_star, red_ring], said).tolist() == [[1, 1, 0], [0, 1, 1]]
    # the loss is lower when the features agree with the positives than when they contradict them
    pos = cp.positives([red_star, red_ring], said)
    good = cp.contrastive_loss(torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[1.0, 0], [1, 1], [0, 1]]),
                               torch.tensor(10.0), pos)
    bad = cp.contrastive_loss(torch.tensor([[0.0, 1], [1, 0]]), torch.tensor([[1.0, 0], [1, 1], [0, 1]]),
                              torch.tensor(10.0), pos)
    assert good < bad


@pytest.fixture(scope="module")
def micro_clip():
    return load_clip(str(cp.clip_folder()))


def test_the_shipped_micro_clip_names_freshly_drawn_scenes(micro_clip):
    """Zero-shot, as report.json states, on scenes from a stream neither training nor its report drew."""
    rng = random.Random("test-micro-clip")
    scenes = [random_scene(rng) for _ in range(160)]
    from lib_ti.micro.shapes import draw

    accuracy = cp.zero_shot(micro_clip, [draw(s) for s in scenes], scenes)
    # the shipped weights: shape 0.46 on 1000 scenes (chance 0.125), colour and background 1.00 (report.json)
    assert accuracy["shape"] >= 0.3, accuracy
    assert accuracy["colour"] >= 0.95 and accuracy["background"] >= 0.95, accuracy
    report = json.loads((cp.clip_folder() / "report.json").read_text())
    assert report["zero_shot"]["clean"]["shape"] >= 0.4 and report["command"].startswith("python -m lib_ti")


def test_editability_texts_name_the_prompts_colour_and_background_not_the_shape(micro_clip):
    cases = token_cases(QualityConfig(renders=4), "my-triangle")
    texts = edit_texts(cases)
    assert texts[0] == f"a {cases[0].colour} shape on a {cases[0].background} background"
    assert all("triangle" not in t for t in texts)
    # the micro CLIP finds a red square on blue nearer "a red shape on a blue background" than a green one
    from lib_ti.micro.shapes import draw

    image = micro_clip.image_features([draw(Scene("square", "red", "blue", 32, 32, 22))])
    sims = image @ micro_clip.text_features(["a red shape on a blue background",
                                             "a green shape on a blue background"]).T
    assert sims[0, 0] > sims[0, 1]


def test_bench_quality_reports_clip_columns_and_their_rank_correlation():
    rows = [{"label": "init word 'shape'", "step": 0, "shape": 0.1, "colour": 0.9, "background": 0.9, "all": 0.1,
             "clip_fidelity": 0.5, "clip_editability": 0.3}]
    rows += [{"label": f"step {s}", "step": s, "shape": sh, "colour": co, "background": 0.9, "all": 0.5,
              "clip_fidelity": f, "clip_editability": e}
             for s, sh, co, f, e in ((25, 0.2, 0.9, 0.6, 0.30), (50, 0.6, 0.8, 0.7, 0.28), (100, 0.9, 0.7, 0.8, 0.2))]
    agreement = clip_agreement(rows, "micro")
    assert agreement["checkpoints"] == 3
    assert agreement["spearman"] == {"clip_fidelity~shape": 1.0, "clip_editability~colour": 1.0,
                                     "clip_editability~background": None}
    report = {"rows": rows, "clip": agreement, "bench": {"renders": 4, "sampler_steps": 2, "cfg_scale": 7.0},
              "prompts": ["p"], "steps_done": 100, "train_wall_s": 1.0, "train_s_per_step": 0.01,
              "train_settings_not_default": {}, "milestones": {"target": 0.8, "first_step_shape_and_colour": None,
                                                               "best_shape": None, "best_colour": None},
              "engine": "standalone", "model": "m", "total_wall_s": 2.0, "grid": "g", "embedding": "e"}
    text = format_report(report)
    assert "clip fid." in text and "fidelity ~ shape +1.00" in text and "background n/a" in text


def test_training_is_deterministic_from_the_seed(tmp_path):
    tokenizer = cp.load_tokenizer(cp.world_tokenizer(tmp_path))
    cfg = cp.ClipConfig(steps=2, batch_size=8, round_trip_pool=0, width=32, text_layers=1, vision_layers=1)
    first, second = (cp.train_clip(cfg, tokenizer).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = cp.train_clip(dataclasses.replace(cfg, seed=1), tokenizer).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow
def test_bench_quality_with_the_micro_clip_adds_its_columns(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "lib_ti", "bench", "quality", "--steps", "4", "--eval-every", "2", "--renders", "3",
         "--sampler-steps", "2", "--num-images", "2", "--clip", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert all(-1 <= r["clip_fidelity"] <= 1 and -1 <= r["clip_editability"] <= 1 for r in report["rows"])
    assert report["clip"]["checkpoints"] == 2 and set(report["clip"]["spearman"]) == {
        "clip_fidelity~shape", "clip_editability~colour", "clip_editability~background"}
    assert "clip fid." in proc.stdout and "Spearman over 2 checkpoints" in proc.stdout
