"""Generated training data of the micro CLIP: the micro SD's own images, labelled by the shape judge.

    maskmill toyworld clip-pool --n 1024 --out outputs/clip-pool.npz

The micro CLIP reads rendered shapes right 99 % of the time but generated ones only 85-87 %
(judged by `classify_shape`). The VAE is not the cause: a VAE round trip of rendered scenes moves
its accuracy by under a point. The cause is how the UNet draws: lumpy outlines, rounded corners,
shapes between two templates. So part of its training data are images the micro SD drew, from a
seed stream of their own (`evaluate.eval_items(n, "clip-train")`: trained captions, own seeds;
never the images of the tune or eval split, never the held-out captions). Each object's region is
recovered from the image's colours (`recover.recover_masks`) and labelled with its prompted colour
and the shape `classify_shape` fits to it, which may differ from the prompted one. A missing object
(fewer than MIN_REGION_PIXELS pixels) gives no region.

The pool is written after every batch and a second call continues it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .recover import MIN_REGION_PIXELS, classify_shape, colour_map, recover_masks

SPLIT = "clip-train"


@dataclass(frozen=True)
class GeneratedRegion:
    image: np.ndarray  # uint8 (H, W, 3), the whole generated image
    mask: np.ndarray  # bool (H, W): the object's colour-recovered region
    occupied: np.ndarray  # bool (H, W): every pixel of a palette colour (background regions avoid them)
    colour: str  # prompted colour (the region is recovered by it)
    shape: str  # classify_shape's verdict on the region
    prompted: str  # the prompted shape


def _save(path: Path, n: int, images: list[np.ndarray], captions: list[str], seconds: float) -> None:
    from ..atomic import atomic_save_npz

    atomic_save_npz(path, {"n": n, "images": np.stack(images), "captions": np.array(captions),
                           "generate_seconds": seconds})


def make_pool(pipe, n: int, out: Path, batch: int = 16, log=print) -> dict:
    """Generate the first n "clip-train" items (half single objects) into `out` (npz); continue a partial pool."""
    from ..generate import generate_plain
    from .evaluate import SETTINGS, eval_items

    if n < 2:
        raise ValueError(f"--n must be >= 2, got {n}")
    out = Path(out)
    items = eval_items(n, SPLIT)
    images, seconds = [], 0.0
    if out.exists():
        saved = np.load(out)
        if int(saved["n"]) != n:
            raise ValueError(f"{out} holds a pool of {int(saved['n'])} items, not {n}: choose another --out")
        images, seconds = list(saved["images"]), float(saved["generate_seconds"])
    for i in range(len(images), n, batch):
        chunk = items[i : i + batch]
        t0 = time.perf_counter()
        images += generate_plain(pipe, [it.caption for it in chunk], [it.seed for it in chunk], SETTINGS)
        seconds += time.perf_counter() - t0
        _save(out, n, images, [it.caption for it in items[: len(images)]], seconds)
        log(f"clip-pool: {len(images)}/{n} images, {seconds / len(images):.2f} s each")
    return {"images": len(images), "generate_seconds": seconds}


def load_regions(path: str | Path) -> list[GeneratedRegion]:
    """Every recovered object region of a pool written by `make_pool`, labelled by `classify_shape`."""
    from .evaluate import eval_items

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generated pool not found: {path} (make it with `maskmill toyworld clip-pool`)")
    saved = np.load(path)
    n, images, captions = int(saved["n"]), saved["images"], [str(c) for c in saved["captions"]]
    if len(images) < n:
        raise ValueError(f"{path} is unfinished: {len(images)} of {n} images (run clip-pool again to finish it)")
    items = eval_items(n, SPLIT)
    if captions != [it.caption for it in items]:
        raise ValueError(f"{path} was not made from the {SPLIT!r} captions this code draws")
    regions = []
    for image, item in zip(images, items):
        labels, _ = recover_masks(image, list(item.colours))
        occupied = colour_map(image) >= 0
        for k, (colour, prompted) in enumerate(zip(item.colours, item.shapes)):
            mask = labels == k + 1
            if mask.sum() >= MIN_REGION_PIXELS:
                regions.append(GeneratedRegion(image, mask, occupied, colour, classify_shape(mask)[0], prompted))
    return regions


def pool_summary(path: str | Path, regions: list[GeneratedRegion]) -> dict:
    """What the model card says about the pool."""
    saved = np.load(path)
    return {"file": Path(path).name, "images": int(saved["n"]), "regions": len(regions),
            "judged_not_prompted": sum(r.shape != r.prompted for r in regions),
            "generate_seconds": round(float(saved["generate_seconds"]), 1)}
