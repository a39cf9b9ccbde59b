"""Batch order: which samples each training step draws, as a pure function of (seed, step).

A resumed run therefore sees exactly the batches the uninterrupted run would have seen, with no
sampler state to save.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .errors import TIError
from .images import Sample


class SampleSampler:
    """Batches of sample indices as a pure function of (seed, step): exact on resume.

    An epoch draws every image ``repeats`` times in a shuffled order; each draw picks
    one of that image's variants (crops, flipped copies) at random. Epochs are
    concatenated into one stream and step ``s`` takes items ``s*batch_size`` to
    ``(s+1)*batch_size - 1`` of it, so no image is ever dropped by batching.
    """

    def __init__(self, samples: Sequence[Sample], *, batch_size: int, repeats: int = 1, seed: int = 0) -> None:
        if not samples:
            raise TIError("no training samples to draw batches from; check the dataset folder")
        for name, value in (("batch_size", batch_size), ("repeats", repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TIError(f"{name} must be an integer >= 1, got {value!r}")
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.image_index, []).append(i)
        self.groups = list(groups.values())
        self.batch_size, self.repeats, self.seed = batch_size, repeats, int(seed)
        self._cache: dict[int, list[int]] = {}

    @property
    def num_images(self) -> int:
        return len(self.groups)

    @property
    def epoch_size(self) -> int:
        """Draws (not batches) per epoch: images x repeats."""
        return self.num_images * self.repeats

    def epoch_order(self, epoch: int) -> list[int]:
        """The sample indices drawn in ``epoch``, in order."""
        if epoch not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            rng = random.Random(f"ti-sampler:{self.seed}:{epoch}")
            draws = [g for g in range(self.num_images) for _ in range(self.repeats)]
            rng.shuffle(draws)
            self._cache[epoch] = [self.groups[g][rng.randrange(len(self.groups[g]))] for g in draws]
        return self._cache[epoch]

    def batch_indices(self, step: int) -> list[int]:
        """The sample indices of the batch at ``step`` (0-based)."""
        if step < 0:
            raise TIError(f"training step must be >= 0, got {step}")
        start = step * self.batch_size
        positions = range(start, start + self.batch_size)
        return [self.epoch_order(p // self.epoch_size)[p % self.epoch_size] for p in positions]




class BucketSampler(SampleSampler):
    """Batches that never mix sizes (aspect-ratio buckets), as a pure function of (seed, step).

    A micro-batch is one stacked latent tensor, so each batch comes from one bucket. Per epoch,
    each bucket's draws (its images x ``repeats``, variants picked at random) are shuffled and
    cut into batches of ``batch_size``; a bucket's last batch may be smaller, since padding it
    would over-train its images. Then all batches are shuffled together. The batch count per
    epoch depends only on the bucket sizes, so step ``s`` is batch ``s % n`` of epoch ``s // n``
    and a resumed run draws exactly what the uninterrupted one would have.
    """

    def __init__(self, samples: Sequence[Sample], *, batch_size: int, repeats: int = 1, seed: int = 0) -> None:
        super().__init__(samples, batch_size=batch_size, repeats=repeats, seed=seed)
        buckets: dict[tuple[int, ...], list[int]] = {}
        for g, group in enumerate(self.groups):  # every variant of an image has the image's size
            buckets.setdefault(tuple(samples[group[0]].pixels.shape[-2:]), []).append(g)
        self.buckets = [buckets[size] for size in sorted(buckets)]  # sorted: independent of the files' order
        self.batches_per_epoch = sum(-(-len(groups) * repeats // batch_size) for groups in self.buckets)
        self._batches: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (sample indices) of ``epoch``, in order."""
        if epoch not in self._batches:
            if len(self._batches) > 8:
                self._batches.clear()
            rng = random.Random(f"ti-buckets:{self.seed}:{epoch}")
            batches = []
            for groups in self.buckets:
                draws = [g for g in groups for _ in range(self.repeats)]
                rng.shuffle(draws)
                picks = [self.groups[g][rng.randrange(len(self.groups[g]))] for g in draws]
                batches += [picks[i:i + self.batch_size] for i in range(0, len(picks), self.batch_size)]
            rng.shuffle(batches)
            self._batches[epoch] = batches
        return self._batches[epoch]

    def epoch_order(self, epoch: int) -> list[int]:
        return [i for batch in self.epoch_batches(epoch) for i in batch]

    def batch_indices(self, step: int) -> list[int]:
        if step < 0:
            raise TIError(f"training step must be >= 0, got {step}")
        epoch, k = divmod(step, self.batches_per_epoch)
        return list(self.epoch_batches(epoch)[k])
