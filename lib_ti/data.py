"""Training data for a run: samples, batch order and captions, ready before any model work."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .config import TrainConfig
from .images import DatasetOptions, Sample, discover, load_samples
from .samplers import BucketSampler, SampleSampler
from .templates import (
    check_captions,
    check_templates,
    is_auto,
    load_templates,
    pick_template,
    render_caption,
    resolve_template,
)


@dataclass
class TrainingData:
    cfg: TrainConfig
    samples: list[Sample]
    templates: list[str]
    sampler: SampleSampler
    template: str = ""  # the template set trained with: cfg.template, or the set ``auto`` chose
    notes: tuple[str, ...] = ()  # what the user should know, e.g. which set ``auto`` chose

    @property
    def num_images(self) -> int:
        return self.sampler.num_images

    def batch_indices(self, draw: int) -> list[int]:
        """Sample indices of the ``draw``-th micro-batch of the run (a pure function of seed and draw)."""
        return self.sampler.batch_indices(draw)

    def caption(self, index: int, rng: random.Random) -> str:
        """A prompt for sample ``index``: a random template line filled with the name and the caption's tags."""
        cfg = self.cfg
        return render_caption(pick_template(self.templates, rng), name=cfg.name, filewords=self.samples[index].caption,
                              rng=rng, shuffle_tags=cfg.shuffle_tags, tag_dropout=cfg.tag_dropout,
                              keep_tokens=cfg.keep_tokens)


def dataset_options(cfg: TrainConfig) -> DatasetOptions:
    return DatasetOptions(width=cfg.width, height=cfg.height, crop=cfg.crop, flip=cfg.flip,
                          random_crops=cfg.random_crops, repeats=cfg.repeats, use_alpha_weight=cfg.use_alpha_weight,
                          buckets=tuple(cfg.bucket_list))


def prepare_data(cfg: TrainConfig) -> TrainingData:
    """Read templates, captions and images; every problem is reported here, before the model is touched."""
    if not is_auto(cfg.template):  # a bad template file is reported before the images are read
        check_templates(load_templates(cfg.template), source=f"template {cfg.template!r}")
    items = discover(cfg.data_dir)
    captions = {item.path.name: item.caption for item in items}
    template, note = resolve_template(cfg.template, captions, cfg.name)
    templates = check_templates(load_templates(template), source=f"template {template!r}")
    check_captions(templates, captions, cfg.name)
    samples = load_samples(items, dataset_options(cfg), seed=cfg.seed)
    sampler_class = BucketSampler if cfg.buckets else SampleSampler
    sampler = sampler_class(samples, batch_size=cfg.batch_size, repeats=cfg.repeats, seed=cfg.seed)
    return TrainingData(cfg, samples, templates, sampler, template, (note,) if note else ())
