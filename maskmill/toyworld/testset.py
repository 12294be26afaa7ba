"""Rendered shapes-world scenes with exact masks, as labelled folders for segmenters.

    maskmill toyworld render-testset --n 256 --out outputs/testsets/plain
    maskmill toyworld render-testset --n 256 --out outputs/testsets/hard --hard

Folder layout (mmsegmentation custom dataset): images/NNNNN.png, masks/NNNNN.png (single-channel,
0 background, 1 + index into SHAPES), classes.json (SHAPES).

"plain" scenes are drawn like the micro model's training scenes (1-3 objects). "hard" scenes are
harder than anything in training, the way real photos are harder than generated ones: 3-4
smaller objects, often touching, on background textures the model never saw (grey stripes,
checks or blotches instead of faint dots).

Every split has its own seed stream, disjoint from the model's training scenes (seeded
[seed, chunk]), the evaluation captions (`evaluate.SPLIT_SEEDS`), the OVDiff scenes
(`bench_ovdiff.SCENE_SEEDS`) and each other: [TESTSET_SEED, split code]. "test" is for reported
figures, "tune" for choosing settings, "oracle" for rendered training data.
"""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .render import BACKGROUND_SATURATION, COLOURS, SHAPES, Scene, ShapeObject, render, sample_scene, shape_mask

TESTSET_SEED = 20261130
SPLIT_CODES = {"test": 1, "tune": 2, "oracle": 3}
HARD_RADIUS = (3.2, 5.0)
HARD_COUNTS = (3, 4)
BACKGROUND_KINDS = ("stripes", "checks", "blotches")


def split_rng(split: str, hard: bool) -> np.random.Generator:
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLIT_CODES)}")
    return np.random.default_rng([TESTSET_SEED, SPLIT_CODES[split], int(hard)])


def _random_object(rng: np.random.Generator, shape: str, colour: str, cx: float, cy: float, r: float) -> ShapeObject:
    return ShapeObject(shape=shape, colour=colour, cx=cx, cy=cy, radius=r,
                       texture=str(rng.choice(["stripes", "dots"])), texture_angle=float(rng.uniform(0, np.pi)),
                       texture_period=float(rng.uniform(3, 5)))


def hard_scene(rng: np.random.Generator, size: int = 32) -> Scene:
    """3-4 small objects of distinct colours; each after the first touches an earlier one half the time."""
    n = int(rng.choice(HARD_COUNTS))
    while True:
        colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=n, replace=False)]
        objects: list[ShapeObject] = []
        occupied = np.zeros((size, size), bool)
        for colour in colours:
            r = float(rng.uniform(*HARD_RADIUS))
            if objects and rng.random() < 0.5:  # next to an earlier object: centres r1 + r2 apart
                other = objects[int(rng.integers(len(objects)))]
                angle = rng.uniform(0, 2 * np.pi)
                d = other.radius + r + float(rng.uniform(-1.5, 0.3))
                cx, cy = other.cx + d * np.cos(angle), other.cy + d * np.sin(angle)
            else:
                cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
            obj = _random_object(rng, str(rng.choice(SHAPES)), colour, float(cx), float(cy), r)
            m = shape_mask(obj.shape, obj.cx, obj.cy, r, size)
            if not (r <= cx <= size - r and r <= cy <= size - r) or (m & occupied).any() or m.sum() < 8:
                break  # out of the frame or overlapping: resample the whole scene
            occupied |= m
            objects.append(obj)
        if len(objects) == n:
            return Scene(objects=objects, size=size)


def unseen_background(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A grey texture unlike training's faint dots, values in [0.3, 0.7] (float HxW)."""
    kind = str(rng.choice(BACKGROUND_KINDS))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    lo, hi = sorted(rng.uniform(0.3, 0.7, size=2))
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        t = (np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / rng.uniform(4, 8)) > 0)
    elif kind == "checks":
        p = int(rng.integers(3, 7))
        t = ((x.astype(int) // p + y.astype(int) // p) % 2) == 0
    else:
        coarse = rng.random((5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR)) > 0.5
    return np.where(t, hi, lo)


def render_hard(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image, instances = render(scene)
    value = unseen_background(rng, scene.size)
    tint = np.array(colorsys.hsv_to_rgb(0.1, BACKGROUND_SATURATION, 1.0), dtype=np.float32)
    bg = (np.clip(value[..., None] * tint, 0, 1) * 255).round().astype(np.uint8)
    image = np.where((instances == 0)[..., None], bg, image)
    return image, instances


def class_labels(scene: Scene, instances: np.ndarray) -> np.ndarray:
    """Instance map -> class ids (1 + SHAPES index), uint8."""
    out = np.zeros(instances.shape, np.uint8)
    for j, obj in enumerate(scene.objects):
        out[instances == j + 1] = SHAPES.index(obj.shape) + 1
    return out


def rendered_scenes(n: int, split: str = "test", hard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n scenes of a split: images uint8 (n, 32, 32, 3), masks uint8 (n, 32, 32) in SHAPES ids."""
    rng = split_rng(split, hard)
    images, masks = [], []
    for _ in range(n):
        scene = hard_scene(rng) if hard else sample_scene(rng)
        image, instances = render_hard(scene, rng) if hard else render(scene)
        images.append(image)
        masks.append(class_labels(scene, instances))
    return np.stack(images), np.stack(masks)


def write_labelled_folder(out: str | Path, images: np.ndarray, masks: np.ndarray, classes: list[str]) -> Path:
    """images/, masks/ (single-channel PNG) and classes.json under `out`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image).save(out / "images" / f"{i:05d}.png")
        Image.fromarray(mask, mode="L").save(out / "masks" / f"{i:05d}.png")
    (out / "classes.json").write_text(json.dumps(list(classes)) + "\n")
    return out


def render_testset(n: int, out: str | Path, hard: bool = False, split: str = "test") -> Path:
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    images, masks = rendered_scenes(n, split, hard)
    return write_labelled_folder(out, images, masks, list(SHAPES))


def oracle_scene(rng: np.random.Generator, objects: list[tuple[str, str]], size: int = 32) -> Scene:
    """A rendered training scene holding exactly `objects` ((colour, shape) pairs), placed like training's."""
    while True:
        scene = sample_scene(rng, n_objects=len(objects), size=size)
        placed = [ShapeObject(shape=shape, colour=colour, cx=o.cx, cy=o.cy, radius=o.radius, texture=o.texture,
                              texture_angle=o.texture_angle, texture_period=o.texture_period)
                  for (colour, shape), o in zip(objects, scene.objects)]
        masks = [shape_mask(o.shape, o.cx, o.cy, o.radius, size) for o in placed]
        if sum(m.sum() for m in masks) == np.logical_or.reduce(masks).sum():  # new shapes may overlap: retry
            return Scene(objects=placed, background_value=scene.background_value,
                         background_period=scene.background_period, background_offset=scene.background_offset,
                         size=size)
