"""The shapes world: deterministic scenes, images that show what their caption says, and the classifier."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from lib_ti.errors import TIError
from lib_ti.micro.shapes import (
    COLOURS,
    GENERIC_SHAPE,
    OUTLINES,
    RING_HOLE,
    SHAPES,
    CaptionMix,
    caption,
    draw,
    random_scene,
    training_caption,
)


def _inside(scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Whether points (pixel coordinates) lie inside the scene's shape, from its definition alone:
    distances for the round shapes, even-odd ray casting for the outlines."""
    u, v = (xs - scene.cx) / scene.radius, (ys - scene.cy) / scene.radius
    r = np.hypot(u, v)
    if scene.shape in ("circle", "ring"):
        return (r <= 1) & ((r >= RING_HOLE) if scene.shape == "ring" else True)
    inside = np.zeros(u.shape, dtype=bool)
    points = OUTLINES[scene.shape]
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _colour_mask(image, rgb) -> np.ndarray:
    return np.abs(np.asarray(image, dtype=np.int16) - np.array(rgb)).max(axis=-1) <= 2


def test_same_seed_same_pixels_and_different_seeds_differ():
    def pictures(seed):
        rng = random.Random(seed)
        return [np.asarray(draw(random_scene(rng))) for _ in range(6)]

    a, b, c = pictures(7), pictures(7), pictures(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_each_image_shows_the_shape_colour_and_background_its_caption_names(shape):
    rng = random.Random(shape)
    for _ in range(4):
        scene = random_scene(rng, shape=shape)
        image = draw(scene)
        assert caption(scene) == f"a {scene.colour} {shape} on a {scene.background} background"
        pixels = np.asarray(image)
        for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
            assert tuple(corner) == COLOURS[scene.background]
        cx, cy = round(scene.cx), round(scene.cy)
        at_centre = tuple(pixels[cy, cx])
        if shape == "ring":  # the hole shows the background; the band around it the shape's colour
            assert at_centre == COLOURS[scene.background]
            band = (1 + RING_HOLE) / 2 * scene.radius
            assert tuple(pixels[cy, round(scene.cx + band)]) == COLOURS[scene.colour]
        else:
            assert at_centre == COLOURS[scene.colour]
        # Pixel by pixel against the shape's definition, away from the anti-aliased edge: a pixel whose
        # neighbourhood (sampled every half pixel up to 1.5 px away) is wholly inside or wholly outside
        # must be exactly the shape's colour or the background's.
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        offsets = np.arange(-1.5, 1.51, 0.5)
        votes = [_inside(scene, xs + dx, ys + dy) for dx in offsets for dy in offsets]
        sure_in, sure_out = np.logical_and.reduce(votes), ~np.logical_or.reduce(votes)
        assert sure_in.sum() > 40  # the check has something to check
        assert _colour_mask(image, COLOURS[scene.colour])[sure_in].all(), shape
        assert _colour_mask(image, COLOURS[scene.background])[sure_out].all(), shape


def test_a_shape_drawn_as_another_fails_the_pixel_check():
    """The check above can tell every pair of shapes apart (same place and size, other outline)."""
    scene = random_scene(random.Random(1), shape="star")
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    masks = {s: _inside(dataclasses.replace(scene, shape=s), xs, ys) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                assert (masks[a] != masks[b]).sum() > 20, (a, b)


def test_scene_arguments_are_checked():
    with pytest.raises(TIError, match="unknown shape 'hexagon'"):
        random_scene(random.Random(0), shape="hexagon")
    with pytest.raises(TIError, match="invisible"):
        random_scene(random.Random(0), colour="red", background="red")
    rng = random.Random(0)
    assert all(s.colour != s.background for s in (random_scene(rng) for _ in range(200)))


def test_training_captions_only_say_true_things_and_leave_parts_out():
    rng = random.Random(0)
    seen = {"empty": 0, "generic": 0, "no colour": 0, "prefix": 0}
    for _ in range(400):
        scene = random_scene(rng)
        text = training_caption(scene, rng, CaptionMix())
        if not text:
            seen["empty"] += 1
            continue
        words = text.split()
        others = [c for c in COLOURS if c not in (scene.colour, scene.background)]
        assert not set(words) & set(others), (text, scene)
        assert scene.shape in words or GENERIC_SHAPE in words
        assert not set(words) & (set(SHAPES) - {scene.shape})
        seen["generic"] += GENERIC_SHAPE in words
        seen["no colour"] += scene.colour not in words
        seen["prefix"] += "photo" in words or "rendering" in words or "rendition" in words
    assert all(count > 10 for count in seen.values()), seen
