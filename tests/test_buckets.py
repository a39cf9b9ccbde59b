"""Aspect-ratio buckets: the sizes, the assignment, the sampler, and training on them end to end."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lib_ti import buckets
from lib_ti.config import TrainConfig
from lib_ti.data import prepare_data
from lib_ti.errors import TIError
from lib_ti.formats.embeddings import load_embedding
from lib_ti.images import DatasetOptions, ImageItem, Sample, load_samples
from lib_ti.samplers import BucketSampler, SampleSampler

# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(("width", "height"), [(512, 512), (1024, 1024), (768, 512), (96, 96)])
def test_bucket_sizes_are_64_multiples_within_limits_and_area(width, height):
    sizes = buckets.bucket_sizes(width, height)
    low, high = buckets.side_limits(width, height)
    assert sizes and len(set(sizes)) == len(sizes)
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0
        assert low <= w <= high and low <= h <= high
        assert w * h <= width * height
    aspects = [w / h for w, h in sizes]
    assert aspects == sorted(aspects) and len(set(aspects)) == len(aspects)  # widest last, no two alike
    assert set(sizes) == {(h, w) for w, h in sizes}  # tall images get the choices wide ones do


def test_square_training_size_is_a_bucket_and_limits_are_honoured():
    sizes = buckets.bucket_sizes(512, 512)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    assert buckets.bucket_sizes(512, 512, 384, 640) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


def test_nearest_bucket_follows_the_aspect():
    sizes = buckets.bucket_sizes(512, 512)
    assert buckets.nearest_bucket((1000, 1000), sizes) == (512, 512)
    assert buckets.nearest_bucket((1920, 1080), sizes) == (640, 384)  # 16:9 -> 5:3, the nearest in log space
    assert buckets.nearest_bucket((1080, 1920), sizes) == (384, 640)
    assert buckets.nearest_bucket((8000, 200), sizes) == (1024, 256)  # as far as the limits allow
    assert buckets.nearest_bucket((200, 8000), sizes) == (256, 1024)  # tall images get the mirrored choices
    counts = buckets.assign([(10, 10), (20, 20), (30, 15)], sizes)
    assert counts == {(512, 512): 2, (704, 320): 1}
    assert buckets.describe(counts) == "512x512 x2, 704x320 x1"


def test_no_bucket_fits_is_an_error_naming_the_fix():
    with pytest.raises(TIError, match="bucket_min_side"):
        buckets.bucket_sizes(128, 128, min_side=256)


@pytest.mark.parametrize(("changes", "field"), [
    ({"bucket_min_side": 100}, "bucket_min_side=100"),
    ({"bucket_max_side": 32}, "bucket_max_side=32"),
    ({"bucket_min_side": 512, "bucket_max_side": 256}, "bucket_max_side=256"),
    ({"buckets": True, "bucket_min_side": 1024}, "bucket_min_side=1024"),
    ({"buckets": True, "bucket_max_side": 128}, "bucket_max_side=128"),
])
def test_config_rejects_bad_bucket_settings(changes, field):
    with pytest.raises(TIError, match=field):
        TrainConfig(**changes)


def test_config_bucket_list():
    assert TrainConfig().bucket_list == []
    assert TrainConfig(buckets=True, width=96, height=96).bucket_list == [(64, 128), (128, 64)]


# ---------------------------------------------------------------- samples and sampler


def drawn(path: Path, size, seed: int) -> Path:
    im = Image.new("RGB", size, (40 * seed % 256, 90, 160))
    ImageDraw.Draw(im).ellipse([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=(250, 200, 30))
    im.save(path)
    return path


@pytest.fixture()
def two_aspects(tmp_path):
    """Two wide (2:1) and two tall (1:2) images."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(160, 80), (200, 100), (80, 160), (90, 180)]):
        drawn(folder / f"{i}.png", size, i)
    return folder


def test_samples_take_their_bucket_size_and_flips_stay_with_them(two_aspects):
    items = [ImageItem(p) for p in sorted(two_aspects.iterdir())]
    opts = DatasetOptions(width=96, height=96, flip=True, buckets=((64, 128), (128, 64)))
    samples = load_samples(items, opts)
    shapes = [(s.source.name, s.flipped, tuple(s.pixels.shape)) for s in samples]
    assert shapes == [("0.png", False, (3, 64, 128)), ("0.png", True, (3, 64, 128)),
                      ("1.png", False, (3, 64, 128)), ("1.png", True, (3, 64, 128)),
                      ("2.png", False, (3, 128, 64)), ("2.png", True, (3, 128, 64)),
                      ("3.png", False, (3, 128, 64)), ("3.png", True, (3, 128, 64))]
    assert torch.equal(samples[1].pixels, samples[0].pixels.flip(-1))


def sized_samples(sizes_per_image):
    return [Sample(torch.zeros(3, h, w), None, None, Path(f"{i}.png"), False, 0, i)
            for i, (w, h) in enumerate(sizes_per_image)]


def test_bucket_batches_never_mix_sizes_and_cover_every_image_each_epoch():
    sizes = [(64, 128)] * 5 + [(128, 64)] * 3 + [(64, 64)]
    samples = sized_samples(sizes)
    sampler = BucketSampler(samples, batch_size=2, repeats=2, seed=3)
    # per bucket ceil(images x repeats / batch): 5 + 3 + 1 batches
    assert sampler.batches_per_epoch == 9
    for epoch in range(4):
        batches = sampler.epoch_batches(epoch)
        assert len(batches) == 9
        assert all(len({tuple(samples[i].pixels.shape) for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == sorted(list(range(9)) * 2)
    stream = [sampler.batch_indices(step) for step in range(27)]
    assert stream == [b for epoch in range(3) for b in sampler.epoch_batches(epoch)]
    assert (
        sampler.batch_indices(8) == sampler.epoch_batches(0)[8]
        and sampler.batch_indices(9) == sampler.epoch_batches(1)[0]
    )
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)


def test_bucket_sampler_is_a_pure_function_of_seed_and_step():
    samples = sized_samples([(64, 128), (128, 64)] * 4)
    a = [BucketSampler(samples, batch_size=3, seed=1).batch_indices(s) for s in range(30)]
    b = BucketSampler(samples, batch_size=3, seed=1)
    assert a == [b.batch_indices(s) for s in reversed(range(30))][::-1]  # any order of asking
    assert a != [BucketSampler(samples, batch_size=3, seed=2).batch_indices(s) for s in range(30)]
    resumed = BucketSampler(samples, batch_size=3, seed=1)  # a fresh sampler, asked from step 17 on
    assert [resumed.batch_indices(s) for s in range(17, 30)] == a[17:]
    with pytest.raises(TIError, match="step"):
        b.batch_indices(-1)


def test_without_buckets_the_plain_sampler_is_used(tmp_path, two_aspects):
    plain = prepare_data(TrainConfig(data_dir=str(two_aspects), width=64, height=64))
    assert type(plain.sampler) is SampleSampler and {tuple(s.pixels.shape) for s in plain.samples} == {(3, 64, 64)}
    bucketed = prepare_data(TrainConfig(data_dir=str(two_aspects), width=96, height=96, buckets=True))
    assert isinstance(bucketed.sampler, BucketSampler)
    assert {tuple(s.pixels.shape) for s in bucketed.samples} == {(3, 64, 128), (3, 128, 64)}


# ---------------------------------------------------------------- training


@contextlib.contextmanager
def recorded_latent_shapes(engine, into: list):
    real_predict = engine.predict

    def predict(noisy_latents, *args, **kwargs):
        into.append(tuple(noisy_latents.shape))
        return real_predict(noisy_latents, *args, **kwargs)

    engine.predict = predict
    try:
        yield
    finally:
        del engine.predict


@pytest.mark.slow
def test_training_on_buckets_uses_both_shapes_and_resumes_exactly(tiny_model, two_aspects, tmp_path):
    from lib_ti.engines.standalone import StandaloneEngine
    from lib_ti.trainer import train

    engine = StandaloneEngine.load(tiny_model("sd1"))
    cfg = TrainConfig(name="tok", init_text="a photo", num_vectors=2, data_dir=str(two_aspects), width=96, height=96,
                      buckets=True, steps=4, batch_size=2, learning_rate="0.05", save_every=0, preview_every=0,
                      log_every=1, flip=True, output_dir=str(tmp_path / "full"))
    shapes: list = []
    with recorded_latent_shapes(engine, shapes):
        full = train(engine, cfg)
    assert full.steps_done == 4
    assert set(shapes) == {(2, 4, 8, 16), (2, 4, 16, 8)}  # both buckets, never a mixed or partial batch here

    stops = iter([False] * 2 + [True])
    split = cfg.replace(output_dir=str(tmp_path / "split"), cache_latents_to_disk=True)
    assert train(engine, split, should_stop=lambda: next(stops)).steps_done == 2
    resumed = train(engine, split, resume=True)  # latents come back from the per-bucket disk cache
    assert list((tmp_path / "split").glob("latents-*.pt"))
    a, b = load_embedding(full.final_path), load_embedding(resumed.final_path)
    assert resumed.steps_done == 4 and all(torch.equal(a.vectors[k], b.vectors[k]) for k in a.vectors)
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "split" / "loss.csv").read_text()
    assert not math.isnan(float((tmp_path / "full" / "loss.csv").read_text().splitlines()[-1].split(",")[1]))
