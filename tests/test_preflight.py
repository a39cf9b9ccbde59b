"""The pre-flight check on real folders: what it counts, what it flags, its exit code; no model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tricky_images import UNICODE_NAME, draw_tricky

from lib_ti.bench.speed import draw_images
from lib_ti.config import TrainConfig
from lib_ti.dataset.preflight import check, detect_family, estimate_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tricky")
    draw_tricky(folder)
    return folder


def config(data, **changes) -> TrainConfig:
    return TrainConfig(**{"name": "my-cup", "data_dir": str(data), "width": 128, "height": 128,
                          "output_dir": str(Path(data).parent / "no-run"), **changes})


def test_every_tricky_variant_is_counted_or_skipped_with_its_reason(tricky):
    report = check(config(tricky, template="object_filewords"))
    assert report.ok, report.problems
    assert {s.path.name: s.reason.split(" (")[0] for s in report.skipped} == {
        "truncated.png": "cannot read it as an image", "notes.png": "cannot read it as an image"}
    sizes = {info.path.name: info.size for info in report.images}
    assert sizes == {"banner.png": (8000, 200), UNICODE_NAME: (128, 96), "cmyk.jpg": (96, 64), "copy.png": (128, 96),
                     "deep16.png": (96, 64), "dot.png": (1, 1), "palette.png": (96, 64),
                     "rotated.jpg": (40, 80)}  # EXIF orientation 6: stored 80x40, trained upright
    assert report.captioned == 2 and report.captions_with_trigger == 1  # "[name], red over blue"
    assert report.template_lines_with_trigger == len(report.templates) == 27
    assert report.size_spread == ((1, 1), (96, 64), (8000, 200))
    assert {info.path.name for info in report.upscaled} == set(sizes) - {"banner.png"}
    warnings = "\n".join(report.warnings)
    assert f"copy.png is a copy of {UNICODE_NAME}: trained on more often" in warnings
    assert "1 image(s) will be enlarged more than 4x and look blurred: dot.png (1x1, 128x);" in warnings
    assert "6 image(s) have no caption" in warnings
    text = report.format()
    assert "images: 8 usable, 2 skipped" in text
    assert "skipped truncated.png: cannot read it as an image (OSError" in text
    assert "sizes: smallest 1x1, median 96x64, largest 8000x200; 7 smaller" in text
    assert text.endswith("[TI Trainer] ready to train")


def test_bucket_summary(tricky):
    report = check(config(tricky, buckets=True))
    assert report.bucket_counts == {(256, 64): 1, (128, 128): 6, (64, 192): 1}
    assert "buckets: 64x192 x1, 128x128 x6, 256x64 x1" in report.format()
    assert report.to_dict()["buckets"] == {"64x192": 1, "128x128": 6, "256x64": 1}


@pytest.mark.parametrize(("changes", "problem"), [
    ({"template": "captions"}, "6 image(s) have no caption"),
    ({"model": "/nonexistent/model.safetensors"}, "model '/nonexistent/model.safetensors' does not exist"),
    ({"init_from": "/nonexistent/emb.pt"}, "init_from '/nonexistent/emb.pt' does not exist"),
    ({"optimizer": "prodigy", "learning_rate": "1.0"}, "pip install prodigyopt"),
    ({"data_dir": "/nonexistent/images"}, "does not exist"),
])
def test_what_would_stop_training_is_a_problem(tricky, changes, problem):
    report = check(config(tricky, **changes))
    assert not report.ok and any(problem in p for p in report.problems), report.problems
    assert "NOT ready" in report.format()


def test_a_folder_without_usable_images(tmp_path):
    (tmp_path / "empty").mkdir()
    assert any("no image files" in p for p in check(config(tmp_path / "empty")).problems)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    (broken / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    report = check(config(broken))
    assert [s.path.name for s in report.skipped] == ["a.png", "b.jpg"]
    assert report.problems == [f"none of the 2 image(s) in {str(broken)!r} can be read: nothing to train on"]


def test_captions_that_never_name_the_trigger(tmp_path):
    data = draw_images(tmp_path / "imgs", 2, 64)
    (data / "00.txt").write_text("[name] on a table")
    (data / "01.txt").write_text("a red ball")
    report = check(config(data, template="captions"))
    assert report.problems == ["template 'captions' uses only [filewords], but 1 caption(s) mention neither [name] "
                               "nor 'my-cup': 01.png; put [name] in them"]
    ignored = check(config(data, template="object"))
    assert ignored.ok and any("2 image(s) have captions but template 'object'" in w for w in ignored.warnings)
    auto = check(config(data))  # the default, auto: captions that do not all name it go after "a photo of a [name], "
    assert auto.ok and auto.template == "object_filewords" and "template 'object_filewords' uses them" in auto.format()
    assert "template auto: 2 of 2 images have a caption" in auto.format()


def test_auto_template_without_captions_and_with_named_ones(tmp_path):
    data = draw_images(tmp_path / "imgs", 2, 64)
    plain = check(config(data))
    assert plain.ok and plain.template == "object" and plain.to_dict()["template"] == "object"
    assert plain.templates[0] == "a photo of a [name]" and "no image has a caption" in plain.format()
    for i in range(2):
        (data / f"0{i}.txt").write_text(f"a red [name] number {i}")
    named = check(config(data))
    assert named.ok and named.templates == ["[filewords]"] and "each caption is the training prompt" in named.format()


@pytest.mark.parametrize(("changes", "warning"), [
    ({"learning_rate": "0.5"}, "0.5 is very high for AdamW"),
    ({"learning_rate": "0.05:10, 0.2"}, "0.2 is very high for AdamW"),
    ({"learning_rate": "1e-6"}, "1e-06 is very low for AdamW"),
    ({"learning_rate": "0.005:100", "steps": 1000}, "ends at step 100"),
])
def test_learning_rate_sanity(tmp_path, changes, warning):
    data = draw_images(tmp_path / "imgs", 1, 64)
    report = check(config(data, **changes))
    assert report.ok and any(warning in w for w in report.warnings), report.warnings


def test_prodigy_wants_a_learning_rate_of_one(tmp_path):
    data = draw_images(tmp_path / "imgs", 1, 64)
    assert any("use 1.0" in w for w in check(config(data, optimizer="prodigy", learning_rate="0.005")).warnings)
    assert not any("Prodigy" in w for w in check(config(data, optimizer="prodigy", learning_rate="1.0")).warnings)
    assert not check(config(data, learning_rate="0.05:10, 0.005")).warnings


def test_memory_estimate_follows_the_documented_formula():
    sd1 = estimate_memory(config(".", width=512, height=512), "sd1")
    # weights: (860 + 123) M x 2 bytes + 84 M x 4 bytes; activations 2.5 GiB per 512x512 image; overhead 1.0
    assert sd1.weights_gib == pytest.approx((983 * 2 + 84 * 4) * 1e6 / 2**30)
    assert sd1.total_gib == pytest.approx(sd1.weights_gib + 2.5 + 1.0)
    batch2 = estimate_memory(config(".", width=512, height=512, batch_size=2), "sd1")
    assert batch2.activations_gib == pytest.approx(5.0)
    checkpointed = estimate_memory(config(".", width=512, height=512, batch_size=2, gradient_checkpointing=True), "sd1")
    assert checkpointed.activations_gib == pytest.approx(5.0 * 0.35)
    sdxl = estimate_memory(config(".", width=1024, height=1024))
    assert sdxl.family == "sdxl" and sdxl.guessed and 12 < sdxl.total_gib < 20
    assert "guessed from the resolution" in sdxl.describe()
    assert "GPU memory" in sd1.describe() and "CPU" not in sd1.describe()


def test_memory_estimate_on_the_cpu_speaks_of_ram_and_float32_weights():
    cpu = estimate_memory(config(".", width=512, height=512), "sd1", on_cpu=True)
    assert cpu.weights_gib == pytest.approx((983 * 4 + 84 * 4) * 1e6 / 2**30)
    assert "RAM (the run computes on the CPU)" in cpu.describe() and "GPU" not in cpu.describe()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_is_read_from_model_files_without_loading_them(tiny_model, family):
    assert detect_family(str(tiny_model(family))) == family
    assert detect_family(str(tiny_model(family, single_file=True))) == family
    report = check(config(".", model=str(tiny_model(family)), data_dir=""))
    assert report.memory.family == family and not report.memory.guessed
    assert report.problems == ["no data folder given (--data DIR): give the folder of training images"]


def test_existing_run_is_a_warning(tricky, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "my-cup-40.state.pt").write_bytes(b"")
    report = check(config(tricky, output_dir=str(run)))
    assert report.ok and any("last at step 40" in w for w in report.warnings)
    assert not any("step 40" in w for w in check(config(tricky, output_dir=str(run), overwrite=True)).warnings)


def test_cli_check_exit_codes_and_json(tricky, cli):
    code, out, err = cli("check", "--data", tricky, "--width", "128", "--height", "128", "--name", "my-cup",
                         "--buckets")
    assert code == 0, err
    assert "images: 8 usable, 2 skipped" in out and "buckets: 64x192 x1" in out
    assert "ready to train" in out and "loading" not in err
    code, out, _ = cli("check", "--data", tricky, "--template", "captions", "--learning-rate", "0.5", "--json")
    assert code == 1
    shown = json.loads(out)
    assert shown["ok"] is False and shown["usable"] == 8 and len(shown["skipped"]) == 2
    assert any("no caption" in p for p in shown["problems"]) and any("very high" in w for w in shown["warnings"])
