"""The shapes world: one flat-coloured shape on a flat background, and the caption that says so.

Images are 64x64. That is the smallest size at which the eight silhouettes stay distinct after
Stable Diffusion's 8x VAE downsampling (a shape spans 3-6 latent cells of the 8x8 latent), and
it keeps the whole pretraining (VAE, text encoder, UNet) inside an hour on a 2-core CPU; 128x128
would quadruple the cost of every UNet and VAE step for no gain in what the benchmark can measure.

Shapes are drawn 4x larger and downsampled, so edges are anti-aliased like a real render. A scene
is a pure function of its ``random.Random``: the same seed gives the same pixels everywhere.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..errors import TIError
from ..templates import BUILTIN_TEMPLATES

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
# Eight colours far apart in RGB, so a blurry render is still unambiguous (a purple, tried first, was
# drawn blue a third of the time: too close to blue once through the VAE).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 225, 50),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "pink": (245, 120, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
MIN_RADIUS, MAX_RADIUS = (
    15,
    26,
)  # pixels: a shape spans half to four fifths of the image (smaller stars blur into blobs in the VAE)
_SUPERSAMPLE = 4
RING_HOLE = 0.55  # inner radius of a ring, as a fraction of its outer radius


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # of the shape
    background: str
    cx: float  # centre, in pixels of the 64x64 image
    cy: float
    radius: float  # half the shape's extent, in pixels


def random_scene(rng: random.Random, *, shape: str | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    """A scene with the given attributes and random others; the background never equals the shape's colour."""
    _check(shape, SHAPES, "shape")
    _check(colour, COLOUR_NAMES, "colour")
    _check(background, COLOUR_NAMES, "background")
    if colour is not None and colour == background:
        raise TIError(f"shape colour and background are both {colour!r}: the shape would be invisible")
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice([c for c in COLOUR_NAMES if c != background])
    background = background or rng.choice([c for c in COLOUR_NAMES if c != colour])
    radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
    margin = radius + 2
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin)
    return Scene(shape, colour, background, cx, cy, radius)


def _check(value: str | None, allowed: tuple[str, ...], what: str) -> None:
    if value is not None and value not in allowed:
        raise TIError(f"unknown {what} {value!r}; the shapes world has {', '.join(allowed)}")


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    s = _SUPERSAMPLE
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    fill = COLOURS[scene.colour]
    if scene.shape in ("circle", "ring"):
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        if scene.shape == "ring":
            hole = r * RING_HOLE
            pen.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=COLOURS[scene.background])
    else:
        pen.polygon([(cx + x * r, cy + y * r) for x, y in OUTLINES[scene.shape]], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _star(points: int = 5, inner: float = 0.48) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        angle = -math.pi / 2 + i * math.pi / points
        radius = 1.0 if i % 2 == 0 else inner
        out.append((radius * math.cos(angle), radius * math.sin(angle) + 0.1))  # +0.1: centre the visual mass
    return out


def _heart(n: int = 48) -> list[tuple[float, float]]:
    # The classic parametric heart, scaled to the unit box (x in [-16, 16], y in [-17, 12] before scaling).
    out = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 16, -(y + 2.5) / 15))
    return out


_ARM = 0.34  # half-width of a cross's arms
# Outlines in units of the radius, y pointing down, centred on (0, 0).
OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "diamond": [(0, -1), (0.72, 0), (0, 1), (-0.72, 0)],
    "triangle": [(0, -1), (0.95, 0.75), (-0.95, 0.75)],
    "star": _star(),
    "heart": _heart(),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1),
              (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
}


def caption(scene: Scene) -> str:
    """The plain caption: "a red star on a blue background"."""
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


# ---------------------------------------------------------------------- pretraining captions
@dataclass(frozen=True)
class CaptionMix:
    """How often the pretraining captions leave things out, so the model learns each word on its own.

    An empty caption teaches the unconditional prediction that classifier-free guidance needs; the
    word "shape" in place of the shape's name gives a neutral word (any shape) to start embeddings
    from; leaving out the colour or background teaches "a star" = a star of any colour, which is what
    an embedding trained with plain "a photo of a [name]" templates sees.
    """

    empty: float = 0.1
    generic_shape: float = 0.1
    no_colour: float = 0.15
    no_background: float = 0.2
    template_prefix: float = 0.3  # "a photo of a ...": the webui's object templates, in the model's world


GENERIC_SHAPE = "shape"


def _template_prefixes() -> tuple[str, ...]:
    return tuple(line.replace(" [name]", "") for line in BUILTIN_TEMPLATES["object"])


def training_caption(scene: Scene, rng: random.Random, mix: CaptionMix = CaptionMix()) -> str:
    """One of the ways to describe ``scene``, drawn with ``rng``."""
    if rng.random() < mix.empty:
        return ""
    shape = GENERIC_SHAPE if rng.random() < mix.generic_shape else scene.shape
    colour = None if rng.random() < mix.no_colour else scene.colour
    background = None if rng.random() < mix.no_background else scene.background
    body = phrase(shape, colour, background, alternative=rng.random() < 0.5)
    article = rng.choice(_template_prefixes()) if rng.random() < mix.template_prefix else "a"
    return f"{article} {body}"


def phrase(shape: str, colour: str | None, background: str | None, *, alternative: bool = False) -> str:
    """"red star on a blue background", or with ``alternative`` "star in red on a blue background"."""
    if colour is None:
        body = shape
    else:
        body = f"{shape} in {colour}" if alternative else f"{colour} {shape}"
    return body if background is None else f"{body} on a {background} background"
