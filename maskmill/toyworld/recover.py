"""True masks of a *generated* shapes-world image, recovered from its own colours.

Objects keep their hue under any texture (textures vary lightness only) and the background
is nearly grey, so a pixel belongs to the object whose palette hue is nearest, provided it is
saturated. The shape of a recovered region is the template that fits it best.
"""
from __future__ import annotations

import numpy as np
from skimage.color import rgb2hsv
from skimage.measure import label as connected_components

from .render import COLOURS, SHAPES, shape_mask

MIN_SATURATION = 0.4
MIN_VALUE = 0.25
MAX_HUE_DISTANCE = 0.07
MIN_REGION_PIXELS = 6


def colour_map(image: np.ndarray) -> np.ndarray:
    """Per pixel: index into COLOURS of its hue, or -1 (background / not a palette colour)."""
    hsv = rgb2hsv(image)
    hues = np.array(list(COLOURS.values()))
    d = np.abs(hsv[..., 0, None] - hues)
    d = np.minimum(d, 1 - d)
    nearest = d.argmin(-1)
    ok = (hsv[..., 1] > MIN_SATURATION) & (hsv[..., 2] > MIN_VALUE) & (d.min(-1) < MAX_HUE_DISTANCE)
    return np.where(ok, nearest, -1)


def _drop_specks(mask: np.ndarray, min_pixels: int = 3) -> np.ndarray:
    lab = connected_components(mask, connectivity=2)
    if lab.max() == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[lab]


def recover_masks(image: np.ndarray, colours: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth for an image whose caption names `colours` in order.

    Returns (labels, extra): labels uint8 (H, W) with 0 background, k for the k-th named object,
    255 for saturated pixels of a colour the caption does not name; extra = bool mask of those.
    """
    cmap = colour_map(image)
    names = list(COLOURS)
    labels = np.zeros(image.shape[:2], dtype=np.uint8)
    named = set()
    for k, c in enumerate(colours):
        m = _drop_specks(cmap == names.index(c))
        labels[m] = k + 1
        named.add(names.index(c))
    extra = np.isin(cmap, [i for i in range(len(names)) if i not in named])
    extra = _drop_specks(extra)
    labels[extra] = 255
    return labels, extra


def _template_candidates(shape: str, mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    # (half-width, top, bottom) of each shape's bounding box in units of its radius (see render.shape_mask)
    extent = {"circle": (1.0, 1.0, 1.0), "square": (0.86, 0.86, 0.86), "triangle": (1.05, 1.0, 0.8),
              "star": (1.046, 1.1, 0.89)}[shape]
    r0 = ((x1 - x0) / (2 * extent[0]) + (y1 - y0) / (extent[1] + extent[2])) / 2
    cx0 = (x0 + x1) / 2
    for r in (r0 * 0.92, r0, r0 * 1.08):
        cy0 = y0 + extent[1] * r
        for dx in (-0.5, 0.0, 0.5):
            for dy in (-0.5, 0.0, 0.5):
                yield cx0 + dx, cy0 + dy, r


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape of a region and its IoU with the fitted template."""
    best = ("none", 0.0)
    if mask.sum() < MIN_REGION_PIXELS:
        return best
    for shape in SHAPES:
        for cx, cy, r in _template_candidates(shape, mask):
            t = shape_mask(shape, cx, cy, r, mask.shape[0])
            iou = (t & mask).sum() / max(1, (t | mask).sum())
            if iou > best[1]:
                best = (shape, float(iou))
    return best
