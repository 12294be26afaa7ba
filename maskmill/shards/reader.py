"""Read shards back with webdataset, decoding each field by its extension.

`webdataset`'s `.decode("pil")` would turn a single-channel mask into RGB, so masks get their
own handler (registered before the image one: "png" also matches "mask.png"). A tar at a URL
(s3://, memory://, ...) is opened through fsspec: webdataset's own openers for these schemes
shell out to command-line tools (gsutil, curl) that know nothing of fsspec's credentials.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from ..storage import is_url, protocol_of
from .layout import RunLayout
from .encode import MASK_FIELD


@dataclass
class DecodedSample:
    key: str
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W)
    meta: dict[str, Any]
    url: str  # the tar it came from


def decode_mask(data: bytes) -> np.ndarray:
    """A mask PNG -> uint8 (H, W). Raises ValueError unless it is single-channel 8-bit ("L")."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "L":
            raise ValueError(f"mask must be a single-channel 8-bit PNG (mode L), got mode {im.mode}")
        return np.asarray(im).copy()


def decode_image(data: bytes) -> np.ndarray:
    """A PNG/JPEG image -> uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).copy()


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    import fsspec

    return fsspec.open(url, mode).open()


def _register_opener(location: str | os.PathLike) -> None:
    """Let webdataset open this URL's protocol through fsspec (file:// stays webdataset's own)."""
    if is_url(location) and protocol_of(location) != "file":
        import importlib

        importlib.import_module("webdataset.gopen").gopen_schemes[protocol_of(location)] = _fsspec_gopen


def raw_samples(tar_path: str | os.PathLike) -> wds.WebDataset:
    """The tar's samples as dicts of raw bytes ("__key__", "__url__", fields), in tar order.

    Iterating raises (e.g. tarfile.ReadError) if the tar is truncated or malformed. Never split
    by node: one given tar is read whole, also inside a torchrun/accelerate launch (WORLD_SIZE > 1),
    where webdataset's default node splitter would refuse to read it.
    """
    _register_opener(tar_path)
    return wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False, nodesplitter=None)


def decoded_samples(tar_path: str | os.PathLike) -> wds.WebDataset:
    """The tar's samples with the mask as uint8 (H, W), the image as uint8 (H, W, 3), json as dict."""
    return raw_samples(tar_path).decode(
        wds.handle_extension(MASK_FIELD, decode_mask),  # first: "png" below would match it too
        wds.handle_extension("png jpg jpeg", decode_image),
    )


def iter_samples(root: str | os.PathLike, max_samples: int | None = None) -> Iterator[DecodedSample]:
    """Samples of a run's completed shards, in shard order, at most `max_samples`."""
    layout = RunLayout(root)
    n = 0
    for shard_id in layout.completed_shards():
        if max_samples is not None and n >= max_samples:
            return
        for s in decoded_samples(layout.tar_location(shard_id)):
            if max_samples is not None and n >= max_samples:
                return
            image = s.get("png", s.get("jpg"))
            yield DecodedSample(key=s["__key__"], image=image, mask=s[MASK_FIELD], meta=s["json"],
                                url=s["__url__"] if is_url(s["__url__"]) else str(Path(s["__url__"])))
            n += 1
