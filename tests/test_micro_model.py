"""The shipped micro Stable Diffusion: its files load everywhere alike, its classifier is accurate, the
pretraining recipe is deterministic, and ``bench quality`` runs end to end (few steps: the figures
themselves come from the full benchmark, see README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_ti.engines.standalone import StandaloneEngine
from lib_ti.micro import assets
from lib_ti.micro.classifier import ShapeClassifier, accuracy_on_fresh_images, load_classifier
from lib_ti.micro.model import NAME

ROOT = Path(__file__).resolve().parents[1]
MAX_SHIPPED_MB = 28  # the issue asks "about 25 MB in all": two fp16 copies of the weights are 24 MB of it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The micro model's tensors are tiny: one thread is as fast on an idle machine, and on a busy one a
    second thread waiting for its core made these tests 20x slower (measured on the 2-core CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro_engines():
    return StandaloneEngine.load(assets.model_folder()), StandaloneEngine.load(assets.single_file())


def test_shipped_files_are_fp16_and_small():
    total = sum(p.stat().st_size for p in assets.ASSETS.rglob("*") if p.is_file()) / 1e6
    assert total <= MAX_SHIPPED_MB, f"{total:.1f} MB shipped"
    weights = [assets.single_file(), *assets.model_folder().rglob("*.safetensors")]
    assert len(weights) == 4  # single file + unet, vae, text encoder
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes <= {"F16", "I64"}, (path, dtypes)  # I64: the CLIP position_ids buffer
    assert assets.single_file().with_suffix(".yaml").is_file()
    assert not (ROOT / ".gitignore").read_text().count("lib_ti/assets")


@torch.no_grad()
def test_folder_and_single_file_load_to_the_same_model(micro_engines):
    folder, single = micro_engines
    assert (folder.family, single.family) == ("sd1", "sd1")
    assert folder.encoder_widths == single.encoder_widths == {"clip_l": 48}
    vectors = folder.init_vectors("shape", 1)
    a = folder.encode_prompts(["a tok in red on a blue background"], "tok", vectors, (64, 64))
    b = single.encode_prompts(["a tok in red on a blue background"], "tok", vectors, (64, 64))
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    cond = type(a)(a.hidden.repeat(2, 1, 1))
    torch.testing.assert_close(folder.predict(x, t, cond), single.predict(x, t, cond), rtol=0, atol=0)
    torch.testing.assert_close(folder.vae.decode(x).sample, single.vae.decode(x).sample, rtol=0, atol=0)
    assert folder.vae.config.scaling_factor == single.vae.config.scaling_factor != 0.18215


@torch.no_grad()
def test_the_single_file_holds_its_own_weights(tmp_path):
    """The single file is loaded with the diffusers folder as its config folder: prove the weights come
    from the file, by loading a copy whose UNet output layer was zeroed."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(assets.single_file()))
    state = {k: torch.zeros_like(v) if k.startswith("model.diffusion_model.out.2.") else v for k, v in state.items()}
    copy = tmp_path / f"{NAME}.safetensors"
    save_file(state, str(copy))
    engine = StandaloneEngine.load(copy, config_dir=assets.model_folder())
    cond = engine.encode_prompts(["a star"], "tok", engine.init_vectors("", 1), (64, 64))
    assert engine.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond).abs().max() == 0


def test_shipped_classifier_is_accurate_on_fresh_generator_images():
    accuracy = accuracy_on_fresh_images(load_classifier(assets.classifier_file()), 300, seed=12345)
    assert accuracy["shape"] >= 0.95 and accuracy["colour"] >= 0.97 and accuracy["background"] >= 0.97, accuracy


def test_classifier_file_with_other_labels_is_refused(tmp_path):
    from safetensors.torch import save_file

    from lib_ti.errors import TIError

    state = {k: v.contiguous() for k, v in ShapeClassifier().state_dict().items()}
    save_file(state, str(tmp_path / "c.safetensors"), metadata={"labels": json.dumps({"shape": ["blob"]})})
    with pytest.raises(TIError, match="other labels"):
        load_classifier(tmp_path / "c.safetensors")


def test_pretraining_stages_are_deterministic():
    from lib_ti.micro.classifier import ClassifierConfig, train_classifier, vae_round_trips
    from lib_ti.micro.pretrain import PretrainConfig, encode_dataset, train_denoiser, train_vae

    cfg = PretrainConfig(vae_steps=2, vae_batch=2, dataset_size=4, steps=2, batch_size=4, warmup_steps=1,
                         classifier=ClassifierConfig(steps=2, batch_size=4))

    def run():
        vae = train_vae(cfg, lambda *_: None)
        scenes, mean, std = encode_dataset(vae, cfg, 0.5, lambda *_: None)
        unet, text = train_denoiser(cfg, scenes, mean, std, lambda *_: None)
        round_trips = vae_round_trips(vae, scenes, mean, 0.5)
        assert round_trips.pixels.shape == (4, 3, 64, 64) and round_trips.labels["shape"].shape == (4,)
        classifier = train_classifier(cfg.classifier, round_trips=round_trips)  # half of each batch from them
        return [m.state_dict() for m in (vae, unet, text, classifier)]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_bench_quality_smoke_run_reports_every_figure_and_writes_the_grid(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "lib_ti", "bench", "quality", "--steps", "4", "--eval-every", "2", "--renders", "3",
         "--sampler-steps", "2", "--num-images", "2", "--out", str(out), "--json", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    concept = report["bench"]["concept"]
    assert [r["label"] for r in report["rows"]] == ["init word 'shape'", "step 2", "step 4", f"word '{concept}'"]
    assert report["engine"] == "standalone" and report["model"] == str(assets.model_folder())
    for row in report["rows"]:
        assert set(row) >= {"shape", "colour", "background", "all"}
        assert all(0 <= row[k] <= 1 for k in ("shape", "colour", "background", "all"))
    assert report["steps_done"] == 4 and report["train_wall_s"] > 0
    # only bookkeeping differs from the trainer's defaults
    assert set(report["train_settings_not_default"]) <= {"name", "init_text", "model", "data_dir", "output_dir",
                                                          "overwrite", "steps", "width", "height", "save_every",
                                                          "keep_last", "preview_every"}
    grid = Image.open(report["grid"])
    assert grid.size[1] >= 4 * 128 and grid.size[0] >= 3 * 128
    assert Path(report["embedding"]).is_file() and "shape" in proc.stdout and "colour" in proc.stdout


@pytest.mark.slow
def test_demo_trains_on_the_micro_model_and_writes_the_before_after_grid(tmp_path):
    """The README's first command, shortened: it must run offline from the shipped files alone."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "lib_ti", "demo", "--steps", "6", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["rows"]] == [
        "init word 'shape'",
        "step 6",
        f"word '{report['bench']['concept']}'",
    ]
    grid = Image.open(out / "grid.png")
    assert grid.size[1] >= 3 * 128  # before, after, and the plain word
    embedding = Path(report["embedding"])
    assert embedding.is_file() and embedding.parent == out / "run"
    assert str(out / "grid.png") in proc.stdout and str(embedding) in proc.stdout
    assert "100%" in proc.stderr  # the progress bar ran to the end


def test_bench_quality_through_a_webui_that_is_not_there_says_so(tmp_path, cli):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = cli("bench", "quality", "--engine", "webui", "--webui-url", f"http://127.0.0.1:{port}",
                       "--out", tmp_path / "bq")
    assert code == 2 and "cannot reach the webui" in err and "--api" in err, err
    code, _, err = cli("bench", "quality", "--engine", "webui", "--model", "x")
    assert code == 2 and "--model is for --engine standalone" in err, err


# The host's train_embedding signature (modules/textual_inversion/textual_inversion.py, v1.10.1): its API needs all.
HOST_TRAIN_ARGS = (
    "id_task embedding_name learn_rate batch_size gradient_step data_root log_directory training_width training_height "
    "varsize steps clip_grad_mode clip_grad_value shuffle_tags tag_drop_out latent_sampling_method use_weight "
    "create_image_every save_embedding_every template_filename save_image_with_stored_embedding preview_from_txt2img "
    "preview_prompt preview_negative_prompt preview_steps preview_sampler_name preview_cfg_scale preview_seed "
    "preview_width preview_height").split()


def test_the_builtin_driver_reads_the_hosts_step_files(tmp_path, cli):
    from safetensors.torch import load_file

    from lib_ti.micro import webui_builtin
    from lib_ti.micro.quality import QualityConfig
    from lib_ti.remote import builtin

    cfg = QualityConfig(steps=200, eval_every=100)
    settings = webui_builtin.builtin_settings(cfg, "builtin-triangle", tmp_path / "images", tmp_path / "log")
    assert list(settings) == HOST_TRAIN_ARGS
    assert (settings["learn_rate"], settings["template_filename"], settings["latent_sampling_method"],
            settings["batch_size"], settings["save_embedding_every"]) == ("0.005", "subject.txt", "once", 1, 100)
    # the host's step files, as its Embedding.save writes them, under <log>/<date>/<name>/embeddings/
    folder = tmp_path / "log" / "2026-12-02" / "builtin-triangle" / "embeddings"
    folder.mkdir(parents=True)
    vectors = {}
    for step in (100, 200):
        vectors[step] = torch.randn(1, 32)
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors[step].requires_grad_()},
                    "name": f"builtin-triangle-{step}", "step": step - 1}, folder / f"builtin-triangle-{step}.pt")
    (folder / "builtin-triangle-100.pt.optim").write_bytes(b"not an embedding")
    files = builtin.step_files(tmp_path / "log", "builtin-triangle")
    assert sorted(files) == [100, 200]
    out = builtin.convert(files[200], tmp_path / "scratch" / "builtin-triangle-200.safetensors")
    (tensor,) = load_file(out).values()  # one key: the host loads it by the file's stem
    assert out.stem == "builtin-triangle-200" and torch.equal(tensor, vectors[200].detach())
    code, _, err = cli("bench", "quality", "--engine", "webui-builtin", "--train-set", "template=captions")
    assert code == 2 and "runs the webui's own trainer at its defaults" in err, err


def test_milestones_name_the_first_step_meeting_both_targets_and_the_best_figures():
    from lib_ti.micro.quality import milestones

    rows = [{"step": 0, "shape": 0.9, "colour": 0.9}, {"step": 100, "shape": 0.85, "colour": 0.7},
            {"step": 200, "shape": 0.8, "colour": 0.82}, {"step": 300, "shape": 0.95, "colour": 0.81},
            {"step": None, "shape": 1.0, "colour": 0.9}]
    m = milestones(rows)
    assert m["first_step_shape_and_colour"] == 200  # the init word's and the plain word's rows do not count
    assert m["best_shape"] == {"step": 300, "shape": 0.95, "other": 0.81}
    assert m["best_colour"] == {"step": 200, "colour": 0.82, "other": 0.8}
    assert milestones(rows[:2])["first_step_shape_and_colour"] is None


def test_eval_at_scores_the_named_checkpoints_which_must_be_saved_ones():
    from lib_ti.errors import TIError
    from lib_ti.micro.quality import QualityConfig

    assert QualityConfig(steps=1000, eval_every=25, eval_at=(100, 25, 1000)).eval_steps == [25, 100, 1000]
    assert QualityConfig(steps=300, eval_every=100).eval_steps == [100, 200, 300]
    for bad in (30, 1025, 0):  # not saved (not a multiple of the interval), past the end, before the start
        with pytest.raises(TIError, match=f"--eval-at {bad} is invalid"):
            QualityConfig(steps=1000, eval_every=25, eval_at=(25, bad))


def test_bench_quality_compares_trainer_settings_but_keeps_its_own(tmp_path):
    from lib_ti.errors import TIError
    from lib_ti.micro.quality import QualityConfig, parse_train_settings, train_config, write_concept_images

    settings = parse_train_settings(["template=captions", "learning-rate=0.002", "num_vectors=2"])
    assert settings == (("template", "captions"), ("learning_rate", 0.002), ("num_vectors", 2))
    tcfg = train_config(QualityConfig(train_settings=settings), "m", tmp_path, "run")
    assert (tcfg.template, tcfg.learning_rate, tcfg.num_vectors, tcfg.steps) == ("captions", "0.002", 2, 500)
    with pytest.raises(TIError, match="set by the benchmark itself"):
        QualityConfig(train_settings=(("steps", 10),))
    with pytest.raises(TIError, match="unknown config key"):
        train_config(QualityConfig(train_settings=(("nonsense", 1),)), "m", tmp_path, "run")
    with pytest.raises(TIError, match="KEY=VALUE"):
        parse_train_settings(["template"])
    # every image has the caption that names all but the concept; the default template (auto) trains with them
    write_concept_images(QualityConfig(num_images=3), tmp_path / "images")
    captions = sorted(p.read_text().strip() for p in (tmp_path / "images").glob("*.txt"))
    assert len(captions) == 3 and all(c.startswith("a ") and " [name] on a " in c for c in captions), captions


@pytest.mark.slow
def test_writing_the_shipped_model_again_reproduces_its_files_byte_for_byte(tmp_path):
    """The single-file converter (formats.model_files) writes exactly what ships: same tensors, same yaml."""
    from diffusers import StableDiffusionPipeline

    from lib_ti.micro import assets
    from lib_ti.micro.model import NAME, save_model

    shipped = assets.ASSETS
    pipe = StableDiffusionPipeline.from_pretrained(assets.model_folder(), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    written = save_model(pipe, tmp_path, clip_root="extensions/sd-webui-ti-trainer/lib_ti/assets/micro-sd")
    assert written["single_file"].read_bytes() == (shipped / f"{NAME}.safetensors").read_bytes()
    assert written["yaml"].read_text() == (shipped / f"{NAME}.yaml").read_text()
    assert not (tmp_path / f"{NAME}.clip_l").exists()  # the yaml names the diffusers folder's tokenizer instead
