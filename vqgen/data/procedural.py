"""A procedurally generated image dataset: one coloured shape on a varied background.

It needs no files, so the demo and the tests use it. Every image is a pure function
of ``(seed, stream, index)``: a per-index NumPy generator draws the parameters and the picture is
rendered with coordinate grids and signed distance functions (anti-aliased edges, no per-pixel
Python loops), so it is fast at any size and identical in every process. The label is the shape
class, which gives class-conditional priors something to learn.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vqgen.errors import ConfigError

SHAPE_NAMES = ("circle", "square", "triangle", "ring", "cross")
BACKGROUNDS = ("solid", "gradient", "two_tone", "stripes")

# Well-separated colours for the palette variant, most distinct first (a palette of n uses the first n).
PALETTE = np.array([
    (0.90, 0.10, 0.10), (0.10, 0.45, 0.95), (0.98, 0.85, 0.10), (0.10, 0.70, 0.25),
    (0.95, 0.95, 0.95), (0.55, 0.15, 0.75), (0.98, 0.50, 0.05), (0.05, 0.80, 0.80),
    (0.95, 0.40, 0.70), (0.45, 0.30, 0.15), (0.08, 0.08, 0.08), (0.60, 0.85, 0.15),
])
SHADE = 0.6  # a palette background's second colour is its first darkened by this factor

# Stream ids keep the train and eval images disjoint for the same seed.
TRAIN_STREAM = 0
EVAL_STREAM = 1


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _box_sdf(x: np.ndarray, y: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    """Exact signed distance to an axis-aligned box centred at the origin (negative inside)."""
    qx, qy = np.abs(x) - half_w, np.abs(y) - half_h
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def _triangle_sdf(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (exact near the edges) to an equilateral triangle with circumradius ``radius``.

    The triangle is the intersection of three half-planes; the max of the distances to their lines
    is what anti-aliasing needs, since only the band within a pixel of the edge matters.
    """
    inradius = radius / 2.0
    normals = np.array([90.0, 210.0, 330.0]) * np.pi / 180.0  # outward edge normals, one per side
    dists = [np.cos(a) * x + np.sin(a) * y - inradius for a in normals]
    return np.maximum.reduce(dists)


def shape_sdf(shape: int, x: np.ndarray, y: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Signed distance in pixels to shape ``shape`` of size ``radius`` centred at (0, 0)."""
    name = SHAPE_NAMES[shape]
    xr, yr = _rotate(x, y, angle)
    if name == "circle":
        return np.hypot(x, y) - radius
    if name == "square":
        return _box_sdf(xr, yr, 0.8 * radius, 0.8 * radius)
    if name == "triangle":
        # A triangle's area is small for its circumradius; scale it up so it reads at 32 px.
        return _triangle_sdf(xr, yr, 1.15 * radius)
    if name == "ring":
        width = max(0.18 * radius, 1.2)
        return np.abs(np.hypot(x, y) - (radius - width)) - width
    if name == "cross":
        arm = max(0.28 * radius, 1.2)
        return np.minimum(_box_sdf(xr, yr, radius, arm), _box_sdf(xr, yr, arm, radius))
    raise ValueError(f"unknown shape class {shape}")


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int,
                palette: np.ndarray | None, kinds: tuple[str, ...] = BACKGROUNDS) -> tuple[np.ndarray, np.ndarray]:
    """Returns the background image [S,S,3] in [0,1] and the colours it was made from [n,3]."""
    kind = kinds[rng.integers(len(kinds))]
    if palette is None:
        c1 = rng.uniform(0.0, 1.0, size=3)
        # The second colour is a nearby shade, so the background stays a background.
        c2 = np.clip(c1 + rng.uniform(-0.35, 0.35, size=3), 0.0, 1.0)
    else:
        c1 = palette[rng.integers(len(palette))]
        c2 = c1 * SHADE
    angle = rng.uniform(0.0, 2.0 * np.pi)
    u, _ = _rotate(x - size / 2.0, y - size / 2.0, angle)  # signed distance along a random direction
    if kind == "solid":
        weight = np.zeros_like(u)
    elif kind == "gradient":
        weight = np.clip(u / size + 0.5, 0.0, 1.0)
    elif kind == "two_tone":
        offset = rng.uniform(-0.25, 0.25) * size
        weight = np.clip(u - offset + 0.5, 0.0, 1.0)  # one-pixel anti-aliased split line
    else:  # stripes
        period = rng.uniform(0.15, 0.35) * size
        weight = 0.5 + 0.5 * np.sin(2.0 * np.pi * u / period)
    image = c1 + weight[..., None] * (c2 - c1)  # [S,S,3]
    return image, np.stack([c1, c2])


def _contrasting_colour(rng: np.random.Generator, avoid: np.ndarray, palette: np.ndarray | None) -> np.ndarray:
    """The candidate colour farthest from every colour in ``avoid`` [n,3], so the shape stands out.

    Candidates: 12 random colours, or 3 distinct palette colours (few enough that the shape's
    colour still varies for a given background).
    """
    if palette is None:
        candidates = rng.uniform(0.0, 1.0, size=(12, 3))
    else:
        candidates = palette[rng.choice(len(palette), size=min(3, len(palette)), replace=False)]
    dists = np.linalg.norm(candidates[:, None, :] - avoid[None, :, :], axis=-1).min(axis=1)
    return candidates[np.argmax(dists)]


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    """``(y, x)`` pixel-centre coordinates, ``[2, S, S]`` float32, read-only: built once per size
    (building them took a third of an image's rendering time at 32x32)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    grid.flags.writeable = False
    return grid


def render_shape_image(rng: np.random.Generator, image_size: int, palette: np.ndarray | None = None,
                       backgrounds: tuple[str, ...] = BACKGROUNDS, rotate: bool = True) -> tuple[np.ndarray, int]:
    """Draw one image from ``rng``: returns (uint8 [S,S,3], shape class).

    ``palette [n,3]`` restricts the colours (None: anywhere in the RGB cube), ``backgrounds`` the
    background kinds; ``rotate = False`` draws every shape upright.
    """
    s = image_size
    y, x = _pixel_centres(s)
    background, bg_colours = _background(rng, x, y, s, palette, backgrounds)

    shape = int(rng.integers(len(SHAPE_NAMES)))
    radius = rng.uniform(0.2, 0.38) * s
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, s - margin, size=2)
    # Drawn either way, so the upright set is the rotated one with the rotation removed.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    angle = angle if rotate else 0.0
    colour = _contrasting_colour(rng, bg_colours, palette)

    sdf = shape_sdf(shape, x - cx, y - cy, radius, angle)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]  # coverage of each pixel, [S,S,1]
    image = background * (1.0 - alpha) + colour * alpha
    return np.round(image * 255.0).astype(np.uint8), shape


def option_problems(palette_size: int, backgrounds: tuple[str, ...]) -> dict[str, str]:
    """What is wrong with the variant options, by option name (empty when they are valid)."""
    problems = {}
    if not 0 <= palette_size <= len(PALETTE) or palette_size == 1:
        problems["palette"] = f"must be 0 (any colour) or 2..{len(PALETTE)}, got {palette_size}"
    if not backgrounds or set(backgrounds) - set(BACKGROUNDS):
        problems["backgrounds"] = f"must be a non-empty subset of {BACKGROUNDS}, got {tuple(backgrounds)}"
    return problems


@dataclass(kw_only=True)
class ProceduralConfig:
    """``data.procedural``: the procedural set (``data.kind = "procedural"``)."""

    size: int = 20000
    """Number of train images; the eval split (another seed stream) has a quarter."""
    palette: int = 0
    """Colours: 0 = anywhere in the RGB cube; 2-12 = only that many fixed, well-separated colours
    (backgrounds shaded with a darker tone of their colour): an easier set for short runs."""
    backgrounds: tuple[Literal["solid", "gradient", "two_tone", "stripes"], ...] = BACKGROUNDS
    """Background kinds to draw from."""
    rotate: bool = True
    """Rotate the shapes by a random angle (False: upright squares, triangles, crosses)."""
    seed: int = 0
    """Seed of the images: the same seed draws the same images."""

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError("size", f"must be >= 1, got {self.size}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        for option, problem in option_problems(self.palette, self.backgrounds).items():
            raise ConfigError(option, problem)

    def split_size(self, split: str) -> int:
        return self.size if split == "train" else max(1, self.size // 4)


class ProceduralShapes:
    """``length`` images of one coloured shape each; item ``i`` is ``(uint8 [S,S,3], class)``.

    Deterministic per ``(seed, stream, index)``; ``stream`` separates the train and eval splits.
    ``palette_size`` > 0 draws every colour from the first ``palette_size`` of :data:`PALETTE`,
    ``backgrounds`` limits the background kinds and ``rotate = False`` keeps the shapes upright:
    easier sets, for runs too short to model the full variety.
    """

    num_classes = len(SHAPE_NAMES)
    class_names = SHAPE_NAMES

    def __init__(self, length: int, image_size: int, seed: int, stream: int = TRAIN_STREAM,
                 palette_size: int = 0, backgrounds: tuple[str, ...] = BACKGROUNDS, rotate: bool = True):
        for option, problem in option_problems(palette_size, backgrounds).items():
            raise ValueError(f"{option}: {problem}")
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.stream = stream
        self.palette = PALETTE[:palette_size] if palette_size else None
        self.backgrounds = tuple(backgrounds)
        self.rotate = rotate

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} procedural images")
        rng = np.random.default_rng([self.seed, self.stream, index])
        return render_shape_image(rng, self.image_size, self.palette, self.backgrounds, self.rotate)
