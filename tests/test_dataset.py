import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_ti.errors import TIError
from lib_ti.images import IMAGE_EXTENSIONS, DatasetOptions, ImageItem, Sample, crop_boxes, discover, load_samples
from lib_ti.samplers import SampleSampler

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(path, color=RED, size=(16, 16), mode="RGB", **save):
    Image.new(mode, size, color).save(path, **save)
    return path


def bands(path, colors=(RED, GREEN, BLUE), band=(32, 32)):
    """Vertical colour bands side by side, each ``band`` (w, h) big."""
    w, h = band
    im = Image.new("RGB", (w * len(colors), h))
    for i, c in enumerate(colors):
        im.paste(c, (i * w, 0, (i + 1) * w, h))
    im.save(path)
    return path


def quadrants(w=32, h=16):
    im = Image.new("RGB", (w, h))
    for (x, y), c in zip([(0, 0), (1, 0), (0, 1), (1, 1)], [RED, GREEN, BLUE, WHITE], strict=True):
        im.paste(c, (x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
    return im


def to_pixels(im):
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def color_of(pixels):
    """Mean RGB (0..255) of a [3, H, W] sample."""
    return tuple(round(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def opts(**kw):
    return DatasetOptions(**{"width": 32, "height": 32, **kw})


def load_one(path, **kw):
    return load_samples([ImageItem(Path(path), None)], opts(**kw))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("field", "value"),
    [("width", 500), ("width", 0), ("height", "512"), ("height", 512.0), ("crop", "fit"), ("flip", 1),
     ("random_crops", 0), ("repeats", 0), ("repeats", True), ("use_alpha_weight", "yes"),
     ("caption_extension", "txt"), ("caption_extension", ".png")],
)
def test_bad_options_name_the_field(field, value):
    with pytest.raises(TIError, match=field) as e:
        DatasetOptions(**{field: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_default_options_are_valid():
    o = DatasetOptions()
    assert (o.width, o.height, o.crop, o.flip, o.random_crops, o.repeats) == (512, 512, "center", False, 4, 1)


# ---------------------------------------------------------------- discover


def test_discover_lists_images_sorted_with_their_captions(tmp_path):
    for name in ["b.png", "a.JPG", "c.d.webp", "画像_é.png", "e.bmp"]:
        solid(tmp_path / name, format="PNG")
    (tmp_path / "a.txt").write_text("  caption of a \n", encoding="utf-8")
    (tmp_path / "c.d.txt").write_bytes("\ufeffcaption of c.d".encode("utf-8"))
    (tmp_path / "画像_é.txt").write_text("ünïcode", encoding="utf-8")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    solid(tmp_path / "sub" / "deep.png")
    items = discover(tmp_path)
    assert [i.path.name for i in items] == ["a.JPG", "b.png", "c.d.webp", "e.bmp", "画像_é.png"]
    assert [i.caption for i in items] == ["caption of a", None, "caption of c.d", None, "ünïcode"]


def test_discover_custom_caption_extension(tmp_path):
    solid(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("wrong")
    (tmp_path / "a.caption").write_text("right")
    assert discover(tmp_path, caption_extension=".caption")[0].caption == "right"


def test_discover_metadata_jsonl(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    solid(tmp_path / "top.png")
    solid(tmp_path / "other.png")
    solid(tmp_path / "train" / "x.png")
    (tmp_path / "other.txt").write_text("from sidecar")
    (tmp_path / "top.txt").write_text("sidecar loses")
    lines = [{"file_name": "train/x.png", "text": "caption x"}, {"file_name": "top.png", "text": " caption top "},
             {"file_name": "other.png"}, {"file_name": "gone.png", "text": "missing"}]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:])
    (tmp_path / "metadata.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "train" / "sub").mkdir()
    folder = tmp_path / "train" / "sub" / ".." / ".."  # un-normalised folders must still match metadata paths
    items = {i.path.relative_to(tmp_path).as_posix(): i.caption for i in discover(folder)}
    assert items == {"train/x.png": "caption x", "top.png": "caption top", "other.png": "from sidecar"}
    err = capsys.readouterr().err
    assert "gone.png" in err and "line 5" in err


@pytest.mark.parametrize(("line", "match"), [("{not json", "line 2.*not valid JSON"),
                                              ('["a.png"]', 'line 2.*"file_name"'),
                                              ('{"file_name": "a.png", "text": 3}', 'line 2.*"text"'),
                                              ('{"file_name": "../a.png"}', "line 2.*outside")])
def test_bad_metadata_line_names_the_line(tmp_path, line, match):
    solid(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises(TIError, match=match):
        discover(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(TIError, match="does not exist") as e:
        discover(tmp_path / "nope")
    assert "nope" in str(e.value)
    with pytest.raises(TIError, match="not a folder"):
        discover(solid(tmp_path / "a.png"))


def test_folder_without_images_says_so(tmp_path):
    (tmp_path / "a.txt").write_text("caption without image")
    with pytest.raises(TIError, match="no image files") as e:
        discover(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and all(ext in msg for ext in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------- loading: the zoo


@pytest.fixture
def zoo(tmp_path):
    """One of every awkward file, with a caption naming each good image."""
    solid(tmp_path / "rgb.png", RED)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = np.linspace(0, 255, 16, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))
    pal.save(tmp_path / "palette.png", transparency=0)
    solid(tmp_path / "cmyk.jpg", (255, 0, 0, 0), mode="CMYK", quality=95)
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "gray16.png")
    solid(tmp_path / "tiny.png", BLUE, size=(1, 1))
    solid(tmp_path / "wide.png", GREEN, size=(8000, 200))
    solid(tmp_path / "ünï 画像.png", BLUE)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.png").unlink()
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for item in discover(tmp_path):
        item.path.with_suffix(".txt").write_text(f"caption {item.path.stem}", encoding="utf-8")
    return tmp_path


BAD = {"truncated.png", "text.png", "empty.jpg"}


def test_zoo_loads_good_images_and_names_the_bad_ones(zoo, capsys):
    items = discover(zoo)
    samples = load_samples(items, opts())
    err = capsys.readouterr().err
    for name in BAD:
        assert name in err
    assert err.count("[TI Trainer] warning: skipping") == 3
    assert {s.source.name for s in samples} == {i.path.name for i in items} - BAD
    assert [s.image_index for s in samples] == list(range(len(samples)))
    for s in samples:
        assert s.pixels.shape == (3, 32, 32) and s.pixels.dtype == torch.float32
        assert s.pixels.min() >= -1 and s.pixels.max() <= 1
        assert s.weight is None and not s.flipped and s.crop_index == 0
        assert s.caption == f"caption {s.source.stem}"


def test_zoo_colors_survive_conversion(zoo):
    by_name = {s.source.name: s for s in load_samples(discover(zoo), opts())}
    assert close(color_of(by_name["rgb.png"].pixels), RED)
    assert close(color_of(by_name["cmyk.jpg"].pixels), (0, 255, 255))
    assert close(color_of(by_name["gray16.png"].pixels), (128, 128, 128), tol=2)  # PIL's convert would give 255
    assert close(color_of(by_name["tiny.png"].pixels), BLUE)
    assert close(color_of(by_name["wide.png"].pixels), GREEN)
    assert close(color_of(by_name["ünï 画像.png"].pixels), BLUE)
    palette = by_name["palette.png"].pixels
    assert close(color_of(palette[:, :, :14]), WHITE)  # transparent half composited onto white
    assert close(color_of(palette[:, :, 18:]), BLUE)


def test_alpha_weights_have_mean_one_and_follow_alpha(zoo):
    samples = load_samples(discover(zoo), opts(use_alpha_weight=True, flip=True))
    by_name = {(s.source.name, s.flipped): s for s in samples}
    w = by_name[("rgba.png", False)].weight
    assert w.shape == (32, 32) and w.dtype == torch.float32
    assert w.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert w.min().item() == pytest.approx(0.0, abs=1e-6)
    columns = w.mean(dim=0)
    assert (columns[1:] >= columns[:-1] - 1e-4).all() and columns[-1] > columns[0]
    assert torch.equal(by_name[("rgba.png", True)].weight, w.flip(-1))
    for name in ["rgb.png", "cmyk.jpg", "gray16.png"]:  # no alpha: equal weights
        assert torch.equal(by_name[(name, False)].weight, torch.ones(32, 32))


def test_fully_opaque_alpha_gives_equal_weights_not_nan(tmp_path):
    solid(tmp_path / "opaque.png", (1, 2, 3, 255), mode="RGBA")
    [s] = load_one(tmp_path / "opaque.png", use_alpha_weight=True)
    assert torch.equal(s.weight, torch.ones(32, 32))


def test_all_bad_folder_fails_before_any_model_work(zoo, capsys):
    items = [i for i in discover(zoo) if i.path.name in BAD]
    with pytest.raises(TIError, match="none of the 3 image") as e:
        load_samples(items, opts())
    assert all(name in str(e.value) for name in BAD)
    assert "3 skipped" in str(e.value)


@pytest.mark.parametrize(("orientation", "transpose"),
                         [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path, orientation, transpose):
    im = quadrants(32, 16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95, subsampling=0)
    [s] = load_samples([ImageItem(tmp_path / "rot.jpg")], DatasetOptions(width=16, height=32))
    expected = to_pixels(im.transpose(transpose))
    wrong = to_pixels(im.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270))
    assert (s.pixels - expected).abs().mean() < 0.1
    assert (s.pixels - wrong).abs().mean() > 0.5


# ---------------------------------------------------------------- geometry


def test_center_crop_keeps_the_middle(tmp_path):
    [s] = load_one(bands(tmp_path / "b.png"))
    assert close(color_of(s.pixels), GREEN)


def test_center_crop_of_a_tall_image(tmp_path):
    im = Image.new("RGB", (32, 96), RED)
    im.paste(BLUE, (0, 32, 32, 64))
    im.save(tmp_path / "tall.png")
    [s] = load_one(tmp_path / "tall.png")
    assert close(color_of(s.pixels), BLUE)


def test_squash_keeps_everything(tmp_path):
    [s] = load_one(bands(tmp_path / "b.png"), crop="squash", width=48, height=16)
    assert s.pixels.shape == (3, 16, 48)
    assert close(color_of(s.pixels[:, :, :14]), RED)
    assert close(color_of(s.pixels[:, :, 18:30]), GREEN)
    assert close(color_of(s.pixels[:, :, 34:]), BLUE)


def test_non_square_target(tmp_path):
    [s] = load_one(solid(tmp_path / "a.png", size=(50, 70)), width=64, height=24)
    assert s.pixels.shape == (3, 24, 64)


def test_flip_adds_an_exact_mirror(tmp_path):
    samples = load_one(bands(tmp_path / "b.png", band=(16, 32)), crop="squash", flip=True)
    assert [(s.flipped, s.crop_index, s.image_index) for s in samples] == [(False, 0, 0), (True, 0, 0)]
    assert torch.equal(samples[1].pixels, samples[0].pixels.flip(-1))
    assert close(color_of(samples[1].pixels[:, :, :8]), BLUE)


def test_random_crops_are_deterministic_and_distinct(tmp_path):
    path = bands(tmp_path / "b.png", colors=(RED, GREEN, BLUE, WHITE))
    a = load_samples([ImageItem(path)], opts(crop="random", random_crops=3, flip=True), seed=1)
    b = load_samples([ImageItem(path)], opts(crop="random", random_crops=3, flip=True), seed=1)
    c = load_samples([ImageItem(path)], opts(crop="random", random_crops=3, flip=True), seed=2)
    assert [(s.crop_index, s.flipped) for s in a] == [(k, f) for k in range(3) for f in (False, True)]
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, c, strict=True))
    unflipped = [s.pixels for s in a if not s.flipped]
    assert not torch.equal(unflipped[0], unflipped[1])


def test_random_crops_collapse_when_nothing_can_move(tmp_path):
    samples = load_one(solid(tmp_path / "sq.png", size=(64, 64)), crop="random", random_crops=4)
    assert len(samples) == 1


def test_crop_boxes_stay_inside_and_cover_the_target_aspect():
    rng = random.Random(0)
    for size in [(8000, 200), (1, 1), (200, 8000), (33, 17)]:
        for crop in ("center", "random"):
            for x0, y0, x1, y1 in crop_boxes(size, opts(width=64, height=32, crop=crop), rng):
                assert 0 <= x0 < x1 <= size[0] + 1e-9 and 0 <= y0 < y1 <= size[1] + 1e-9
                assert (x1 - x0) / (y1 - y0) == pytest.approx(2.0, rel=1e-6) or size == (1, 1)


# ---------------------------------------------------------------- sampler


def fake_samples(variants_per_image=(2, 1, 4)):
    out = []
    for image, n in enumerate(variants_per_image):
        out += [Sample(torch.zeros(1), None, None, Path(f"{image}.png"), k % 2 == 1, k // 2, image) for k in range(n)]
    return out


def image_of(samples, indices):
    return [samples[i].image_index for i in indices]


def test_epoch_draws_each_image_repeats_times():
    samples = fake_samples()
    sampler = SampleSampler(samples, batch_size=2, repeats=3, seed=0)
    assert sampler.num_images == 3 and sampler.epoch_size == 9
    for epoch in range(5):
        images = image_of(samples, sampler.epoch_order(epoch))
        assert sorted(images) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_batches_are_the_concatenated_epochs():
    samples = fake_samples()
    sampler = SampleSampler(samples, batch_size=4, repeats=2, seed=5)
    stream = [i for step in range(9) for i in sampler.batch_indices(step)]  # 36 draws = 6 epochs
    assert stream == [i for e in range(6) for i in sampler.epoch_order(e)]
    # 6 draws per epoch, 4 per batch: step 2 takes draws 8-11 (epoch 1), step 8 draws 32-35 (epoch 5)
    assert (
        sampler.batch_indices(2) == sampler.epoch_order(1)[2:6]
        and sampler.batch_indices(8) == sampler.epoch_order(5)[2:6]
    )


def test_variants_are_all_used():
    samples = fake_samples((2, 4))
    sampler = SampleSampler(samples, batch_size=1, seed=0)
    seen = {i for e in range(40) for i in sampler.epoch_order(e)}
    assert seen == set(range(6))


def test_sampler_is_deterministic_and_seed_dependent():
    samples = fake_samples((1,) * 10)
    a = [SampleSampler(samples, batch_size=3, seed=1).batch_indices(s) for s in range(20)]
    b = [SampleSampler(samples, batch_size=3, seed=1).batch_indices(s) for s in range(20)]
    c = [SampleSampler(samples, batch_size=3, seed=2).batch_indices(s) for s in range(20)]
    assert a == b and a != c
    assert a[:4] != a[4:8]  # epochs are reshuffled


def test_resume_is_exact():
    samples = fake_samples()
    run = SampleSampler(samples, batch_size=2, repeats=2, seed=9)
    first = [run.batch_indices(s) for s in range(25)]
    resumed = SampleSampler(samples, batch_size=2, repeats=2, seed=9)  # a fresh sampler, asked from step 11 on
    assert [resumed.batch_indices(s) for s in range(11, 25)] == first[11:]


def test_batch_larger_than_an_epoch():
    samples = fake_samples((1, 1))
    batch = SampleSampler(samples, batch_size=5, seed=0).batch_indices(0)
    assert len(batch) == 5 and set(batch) == {0, 1}


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"batch_size": 1, "repeats": 0}, {"batch_size": 2.0}])
def test_sampler_rejects_bad_arguments(kw):
    with pytest.raises(TIError):
        SampleSampler(fake_samples(), **kw)
    with pytest.raises(TIError, match="no training samples"):
        SampleSampler([], batch_size=1)
    with pytest.raises(TIError, match="step"):
        SampleSampler(fake_samples(), batch_size=1).batch_indices(-1)
