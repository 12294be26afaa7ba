"""Training and test data of the micro CLIP: rendered scenes, object regions and background regions.

Every item is a 32x32 image with a meaning: ("obj", colour, shape), ("scene", canonical key) or
("bg",). Object and background items are cut out with the consistency check's own `region_crop`
(crop to the mask's box, fill the rest), from masks perturbed the way attention masks err:
a pixel grown or shrunk, or coarsened to 8x8 / 16x16 and upsampled. Background items take a
random shape's outline on empty background, like a mask that found no object. Blur and noise
bring rendered images closer to generated ones; `distort` (train-clip --distort) also warps half
the scenes and gives masks ragged outlines. Items of generated images (`clip_generated.py`) are
cut the same way from their colour-recovered regions, captioned with the shape the judge sees.

Captions: "a red circle" or "a circle" for objects, the scene caption for scenes, BACKGROUND for
background. A caption matches every item it describes ("a circle" matches every circle, and every
scene with a circle in it), so the contrastive loss has several positives where captions repeat.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter, map_coordinates

from ..clipcheck import region_crop
from .render import COLOURS, IMAGE_SIZE, SHAPES, Scene, canonical_key, caption_for, is_held_out, render, \
    sample_scene, shape_mask

BACKGROUND = "background"
KIND_WEIGHTS = {"scene": 0.25, "obj": 0.6, "bg": 0.15}
GENERATED_KINDS = {"gen": 0.85, "genbg": 0.15}  # generated object / background regions, within their share


def kind_weights(generated_share: float = 0.0) -> dict[str, float]:
    """Item kinds and their weights: `generated_share` of the items come from generated images."""
    weights = {k: w * (1 - generated_share) for k, w in KIND_WEIGHTS.items()}
    if generated_share > 0:
        weights.update({k: w * generated_share for k, w in GENERATED_KINDS.items()})
    return weights


@dataclass(frozen=True)
class RenderedScene:
    scene: Scene
    image: np.ndarray  # uint8 (32, 32, 3)
    labels: np.ndarray  # 0 background, i + 1 object i


def render_pool(n: int, seed: int, held_out: bool = False) -> list[RenderedScene]:
    """n rendered scenes; multi-object captions held out of the micro SD's training are excluded
    (or, with held_out=True, only single objects and held-out captions are kept)."""
    rng = np.random.default_rng(seed)
    pool = []
    while len(pool) < n:
        scene = sample_scene(rng)
        if len(scene.objects) > 1 and is_held_out(scene.objects) != held_out:
            continue
        image, labels = render(scene)
        pool.append(RenderedScene(scene, image, labels))
    return pool


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise, half the time each (generated images are softer than rendered ones)."""
    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x = gaussian_filter(x, sigma=(rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), 0))
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(2, 8), x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def warp(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, amplitude: float = 1.2,
         smooth: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random displacement of image and labels together: lumpy outlines, as generated shapes have."""
    n = labels.shape[0]
    dy, dx = (gaussian_filter(rng.normal(0, 1, (n, n)), smooth) for _ in range(2))
    scale = amplitude / max(1e-6, float(np.abs(np.stack([dy, dx])).max()))
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    coords = np.stack([y + dy * scale, x + dx * scale])
    warped = np.stack([map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="nearest")
                       for c in range(3)], -1)
    return warped.round().astype(np.uint8), map_coordinates(labels, coords, order=0, mode="nearest")


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, rough: bool = False) -> np.ndarray:
    """A plausible attention mask of a true object mask (never empty); `rough` adds ragged outlines."""
    out = mask
    u = rng.random()
    if u < 0.35:
        side = int(rng.choice([8, 16]))
        f = mask.shape[0] // side
        coarse = mask.reshape(side, f, side, f).mean(axis=(1, 3))
        up = np.kron(coarse, np.ones((f, f)))
        out = gaussian_filter(up, sigma=f / 2) > rng.uniform(0.3, 0.6)
    elif u < 0.6:
        out = binary_dilation(mask, iterations=1)
    elif u < 0.75:
        out = binary_erosion(mask, iterations=1)
    elif rough and u < 0.9:
        out = gaussian_filter(mask.astype(np.float32) + rng.normal(0, 0.3, mask.shape), 0.7) > 0.5
    return out if out.sum() >= 4 else mask


def background_mask(labels: np.ndarray, rng: np.random.Generator, tries: int = 20) -> np.ndarray | None:
    """A random shape's outline on empty background (>= 70 % of it free of objects), or None."""
    free = ~binary_dilation(labels > 0, iterations=1)
    for _ in range(tries):
        r = rng.uniform(3.0, 7.5)
        cx, cy = rng.uniform(r, IMAGE_SIZE - r, size=2)
        m = shape_mask(str(rng.choice(SHAPES)), float(cx), float(cy), float(r))
        kept = m & free
        if m.sum() and kept.sum() >= 0.7 * m.sum() and kept.sum() >= 6:
            return kept
    return None


def object_caption(colour: str, shape: str, with_colour: bool) -> str:
    return f"a {colour} {shape}" if with_colour else f"a {shape}"


def caption_meaning(caption: str) -> tuple:
    """What a training caption claims: ("obj", colour | None, shape), ("scene", key) or ("bg",)."""
    if caption == BACKGROUND:
        return ("bg",)
    words = caption.replace(",", " ").split()
    if " and " in caption:
        return ("scene", _scene_key_of(caption))
    if len(words) == 3 and words[1] in COLOURS and words[2] in SHAPES:
        return ("obj", words[1], words[2])
    if len(words) == 2 and words[1] in SHAPES:
        return ("obj", None, words[1])
    raise ValueError(f"not a training caption: {caption!r}")


def _scene_key_of(caption: str) -> str:
    phrases = [p.strip() for p in caption.replace(" and ", ", ").split(",")]
    return " + ".join(sorted(p[2:] if p.startswith("a ") else p for p in phrases))


def describes(caption_meaning_: tuple, item_meaning: tuple) -> bool:
    """Does a caption describe an item? A single object's scene is the object itself, and an object
    caption ("a circle", "a red circle") is true of every scene holding such an object: what
    OVDiff's class pre-filter asks of a whole image."""
    if item_meaning[0] == "scene" and caption_meaning_[0] == "obj":
        objects = [tuple(phrase.split()) for phrase in item_meaning[1].split(" + ")]
        return any(describes(caption_meaning_, ("obj", colour, shape)) for colour, shape in objects)
    if caption_meaning_[0] != item_meaning[0]:
        return False
    if caption_meaning_[0] == "obj":
        return caption_meaning_[2] == item_meaning[2] and caption_meaning_[1] in (None, item_meaning[1])
    return caption_meaning_ == item_meaning


def _generated_item(region, kind: str, rng: np.random.Generator, size: int) -> tuple | None:
    """(crop, caption, meaning) of a generated image: its object region ("gen") or a background region ("genbg")."""
    if kind == "gen":
        crop = region_crop(region.image, perturb_mask(region.mask, rng), size, float(rng.uniform(0.0, 0.3)))
        return crop, object_caption(region.colour, region.shape, bool(rng.random() < 0.5)), \
            ("obj", region.colour, region.shape)
    mask = background_mask(region.occupied.astype(np.uint8), rng)
    if mask is None:
        return None
    return region_crop(region.image, mask, size, float(rng.uniform(0.0, 0.3))), BACKGROUND, ("bg",)


def sample_batch(pool: list[RenderedScene], n: int, rng: np.random.Generator, size: int = IMAGE_SIZE,
                 kind_weights: dict[str, float] = KIND_WEIGHTS, distort: bool = False,
                 generated: list | None = None) -> tuple[np.ndarray, list[str], list[tuple]]:
    """(uint8 images (n, size, size, 3), captions, meanings) of randomly drawn, augmented items.

    generated: `clip_generated.GeneratedRegion`s for the kinds "gen" (an object region, captioned
    with its judged shape) and "genbg" (a background region of a generated image)."""
    kinds, weights = list(kind_weights), np.array(list(kind_weights.values()))
    if not generated and {"gen", "genbg"} & {k for k, w in kind_weights.items() if w > 0}:
        raise ValueError("kinds 'gen' and 'genbg' need generated regions")
    images, captions, meanings = [], [], []
    while len(images) < n:
        item = pool[int(rng.integers(len(pool)))]  # drawn first for every kind: the rendered-only stream is unchanged
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        if kind in ("gen", "genbg"):
            drawn = _generated_item(generated[int(rng.integers(len(generated)))], kind, rng, size)
            if drawn is not None:
                images.append(drawn[0])
                captions.append(drawn[1])
                meanings.append(drawn[2])
            continue
        image, labels = item.image, item.labels
        if distort and rng.random() < 0.5:
            image, labels = warp(image, labels, rng)
            if any((labels == i + 1).sum() < 6 for i in range(len(item.scene.objects))):
                image, labels = item.image, item.labels
        image = degrade(image, rng)
        if kind == "scene":
            images.append(image if size == IMAGE_SIZE else region_crop(image, np.ones_like(labels, bool), size, 0))
            captions.append(caption_for(item.scene.objects))
            meanings.append(("scene", canonical_key(item.scene.objects)))
        elif kind == "obj":
            i = int(rng.integers(len(item.scene.objects)))
            obj = item.scene.objects[i]
            mask = perturb_mask(labels == i + 1, rng, rough=distort)
            images.append(region_crop(image, mask, size, float(rng.uniform(0.0, 0.3))))
            captions.append(object_caption(obj.colour, obj.shape, bool(rng.random() < 0.5)))
            meanings.append(("obj", obj.colour, obj.shape))
        else:
            mask = background_mask(labels, rng)
            if mask is None:
                continue
            images.append(region_crop(image, mask, size, float(rng.uniform(0.0, 0.3))))
            captions.append(BACKGROUND)
            meanings.append(("bg",))
    return np.stack(images), captions, meanings
