"""Reading user images as 8-bit RGB, whatever PIL mode they come in.

`Image.convert("RGB")` clips 16- and 32-bit greyscale to 255 (a 16-bit PNG turns white) and
ignores float ranges, so the high-bit modes are scaled here first; the rest are PIL's own
conversions. An image that cannot become RGB is refused in one line (`ImageModeError`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Modes PIL converts to RGB correctly by itself.
_DIRECT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageModeError(ValueError):
    """An image whose pixels cannot be read as RGB."""


def _grey_to_uint8(a: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB of any image PIL opens.

    16-bit greyscale (I;16*) is scaled by 255/65535; 32-bit integer greyscale (I) by its own
    range: 8-bit if its values fit in 0..255, 16-bit if they fit in 0..65535 (how PNG 16-bit
    files often open), else its maximum; float greyscale (F) as 0..1 if it fits there, else 0..255.
    """
    mode = im.mode
    if mode in _DIRECT:
        try:
            return np.asarray(im.convert("RGB")).copy()
        except (ValueError, OSError) as e:
            raise ImageModeError(f"cannot convert an image of PIL mode {mode!r} to RGB: {e}") from None
    if mode.startswith("I;16"):
        grey = _grey_to_uint8(np.asarray(im), 65535.0)
    elif mode == "I":
        a = np.asarray(im)
        if a.size and a.min() < 0:
            raise ImageModeError("32-bit greyscale image with negative values: cannot tell its range")
        top = float(a.max()) if a.size else 0.0
        grey = _grey_to_uint8(a, 255.0 if top <= 255 else 65535.0 if top <= 65535 else top)
    elif mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageModeError("float image holds NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0:
            raise ImageModeError(f"float image with negative values (min {lo:g}): cannot tell its range")
        grey = _grey_to_uint8(a, 1.0 if hi <= 1.0 else 255.0)
    else:
        raise ImageModeError(f"images of PIL mode {mode!r} are not supported; save it as 8-bit RGB or greyscale")
    return np.repeat(grey[..., None], 3, axis=2)


def read_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB of the image file at `path` (see `to_rgb`)."""
    with Image.open(path) as im:
        return to_rgb(im)


def fit_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """`image` resized (bicubic, aspect kept) so its longer side is at most `max_side`; unchanged if it fits."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def labels_to_size(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map scaled (nearest neighbour: labels are not averaged) to height x width."""
    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
