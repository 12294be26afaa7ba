"""Shapes world: rendered scenes with captions and pixel-exact per-object masks.

Scenes hold 1-3 textured shapes (circle, square, triangle, star) on a faint dotted
grey background. Textures vary lightness only, so every object keeps its hue and
the true mask of a *generated* image can be recovered from its own colours
(see `recover.py`). Stripes and dots force the model to keep an object coherent,
which is what makes its self-attention group objects.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from skimage.draw import disk, polygon

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "star")
# Hues (0..1) far apart so that nearest-hue recovery is unambiguous.
COLOURS = {"red": 0.0, "yellow": 0.15, "green": 0.36, "blue": 0.62}
OBJECT_SATURATION = 0.85
LIGHT_LEVELS = (0.95, 0.55)  # texture = two lightness levels of one hue
BACKGROUND_SATURATION = 0.05
SUPERSAMPLE = 4
RADIUS_RANGE = (5.0, 7.5)
COUNT_WEIGHTS = {1: 0.4, 2: 0.35, 3: 0.25}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    texture: str = "stripes"  # "stripes" | "dots"
    texture_angle: float = 0.0
    texture_period: float = 4.0

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[ShapeObject]
    background_value: float = 0.5
    background_period: int = 5
    background_offset: tuple[int, int] = (0, 0)
    size: int = IMAGE_SIZE
    caption: str = field(default="")

    def __post_init__(self) -> None:
        if not self.caption:
            self.caption = caption_for(self.objects)


def caption_for(objects: list[ShapeObject]) -> str:
    return join_phrases([o.phrase for o in objects])


def join_phrases(phrases: list[str]) -> str:
    """["red circle", "blue star"] -> "a red circle and a blue star" (three: "a, b and c")."""
    items = [f"a {p}" for p in phrases]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def canonical_key(objects: list[ShapeObject]) -> str:
    """Order-free identity of a caption: used to hold captions out of training."""
    return " + ".join(sorted(o.phrase for o in objects))


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of one shape: a pixel belongs when >= half its area is covered."""
    s = SUPERSAMPLE
    big = np.zeros((size * s, size * s), dtype=np.float32)
    bx, by, br = cx * s, cy * s, radius * s
    if shape == "circle":
        rr, cc = disk((by, bx), br, shape=big.shape)
    else:
        if shape == "square":
            h = br * 0.86  # similar area to the circle
            ys, xs = [by - h, by - h, by + h, by + h], [bx - h, bx + h, bx + h, bx - h]
        elif shape == "triangle":
            ys = [by - br, by + br * 0.8, by + br * 0.8]
            xs = [bx, bx + br * 1.05, bx - br * 1.05]
        elif shape == "star":
            ang = -np.pi / 2 + np.arange(10) * np.pi / 5
            rad = np.where(np.arange(10) % 2 == 0, br * 1.1, br * 0.5)
            ys, xs = by + rad * np.sin(ang), bx + rad * np.cos(ang)
        else:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        rr, cc = polygon(np.asarray(ys), np.asarray(xs), shape=big.shape)
    big[rr, cc] = 1.0
    return big.reshape(size, s, size, s).mean(axis=(1, 3)) >= 0.5


def _texture(obj: ShapeObject, size: int) -> np.ndarray:
    """Per-pixel lightness level index (0 light, 1 dark) of an object's texture."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if obj.texture == "stripes":
        t = x * np.cos(obj.texture_angle) + y * np.sin(obj.texture_angle)
        return (np.sin(2 * np.pi * t / obj.texture_period) > 0).astype(np.int64)
    p = max(3, int(round(obj.texture_period)))
    return (((x.astype(int) % p) < p // 2) & ((y.astype(int) % p) < p // 2)).astype(np.int64)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 RGB image HxWx3, int label map HxW: 0 background, i+1 object i)."""
    n = scene.size
    y, x = np.mgrid[0:n, 0:n]
    ox, oy = scene.background_offset
    p = scene.background_period
    dots = ((x + ox) % p == 0) & ((y + oy) % p == 0)
    value = np.where(dots, scene.background_value + 0.1, scene.background_value)
    rgb = np.stack([value] * 3, axis=-1).astype(np.float32)
    tint = np.array(colorsys.hsv_to_rgb(0.1, BACKGROUND_SATURATION, 1.0), dtype=np.float32)
    rgb *= tint
    labels = np.zeros((n, n), dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        m = shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, n)
        level = _texture(obj, n)
        for li, v in enumerate(LIGHT_LEVELS):
            colour = np.array(colorsys.hsv_to_rgb(COLOURS[obj.colour], OBJECT_SATURATION, v), dtype=np.float32)
            sel = m & (level == li)
            rgb[sel] = colour
        labels[m] = i + 1
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), labels


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = IMAGE_SIZE) -> Scene:
    """Sample a scene without overlaps; a failed placement resamples the whole scene."""
    if n_objects is None:
        counts = list(COUNT_WEIGHTS)
        n_objects = int(rng.choice(counts, p=np.array(list(COUNT_WEIGHTS.values()))))
    colours = list(COLOURS)
    while True:
        chosen = rng.choice(len(colours), size=n_objects, replace=False)
        objects = []
        occupied = np.zeros((size, size), dtype=bool)
        ok = True
        for ci in chosen:
            r = float(rng.uniform(*RADIUS_RANGE))
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
            obj = ShapeObject(
                shape=str(rng.choice(SHAPES)), colour=colours[int(ci)], cx=cx, cy=cy, radius=r,
                texture=str(rng.choice(["stripes", "dots"])),
                texture_angle=float(rng.uniform(0, np.pi)), texture_period=float(rng.uniform(3, 5)),
            )
            m = shape_mask(obj.shape, cx, cy, r, size)
            grown = m | np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1)
            if (grown & occupied).any():
                ok = False
                break
            occupied |= m
            objects.append(obj)
        if ok:
            break
    return Scene(
        objects=objects, background_value=float(rng.uniform(0.35, 0.6)),
        background_period=int(rng.integers(4, 7)), background_offset=(int(rng.integers(0, 6)), int(rng.integers(0, 6))),
        size=size,
    )


def is_held_out(objects: list[ShapeObject], fraction: float = 0.15) -> bool:
    """Multi-object captions whose canonical key hashes into `fraction` never enter training.

    Single-object captions (16 of them) are all trained on; evaluation uses new seeds for those.
    """
    if len(objects) < 2:
        return False
    import hashlib

    h = int(hashlib.sha256(canonical_key(objects).encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000
