"""How one sample's members are encoded: the image (png | jpg), the mask (8-bit PNG), the metadata (JSON)."""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

IMAGE_FORMATS = ("png", "jpg")
MASK_FIELD = "mask.png"
META_FIELD = "json"
JPEG_QUALITY = 95


def sample_fields(image_format: str) -> tuple[str, ...]:
    """The members every sample of a shard written with `image_format` has (besides __key__)."""
    return (image_format, META_FIELD, MASK_FIELD)


def _json_default(o: Any) -> Any:
    # Extractors hand out numpy confidences; converting here spares every caller the .tolist().
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# One encoder for every call: json.dumps with options builds a new one each time (4 per record).
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                         default=_json_default)


def json_text(obj: Any) -> str:
    """Deterministic, strict JSON (sorted keys; NaN refused; numpy scalars/arrays converted)."""
    return _JSON.encode(obj)


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Single-channel 8-bit PNG: lossless, and read back as mode "L" (not RGB, not a palette)."""
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")  # a 2-D uint8 array becomes mode "L"
    return buf.getvalue()
