"""A contact sheet of a run: each sample's image with its mask overlaid, class names beneath.

    contact_sheet("outputs/run-1", "outputs/run-1/preview.png", max_samples=64)
    contact_sheet("s3://bucket/run-1", "s3://bucket/run-1/preview.png")    # runs and sheets at URLs too

Every class id gets its own colour (the same in every tile and in the names under it),
class boundaries are outlined, ignore pixels (255) are hatched in grey, background is left
as is. Tiny images (the 32 px toy world) are enlarged with nearest neighbour so single
pixels stay visible; large ones are shrunk to the tile.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskmill.shards.layout import RunLayout
from maskmill.shards.reader import DecodedSample, iter_samples
from maskmill.shards.labels import class_color
from maskmill.shards.records import BACKGROUND, IGNORE
from maskmill.storage import write_location

SHEET_BG = (28, 28, 28)
TEXT = (235, 235, 235)
ABSENT_TEXT = (130, 130, 130)  # a prompted class that got no pixels
HATCH = ((105, 105, 105), (175, 175, 175))  # the two greys of the ignore stripes
OVERLAY_ALPHA = 0.5
PAD = 4
TEXT_LINES = 3  # the key, then up to two lines of class names


def _fit(image: np.ndarray, mask: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask resized together to fit `tile`: integer nearest-neighbour upscaling, or a shrink."""
    h, w = mask.shape
    if max(h, w) <= tile:
        f = max(1, tile // max(h, w))
        return image.repeat(f, 0).repeat(f, 1), mask.repeat(f, 0).repeat(f, 1)
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(image).resize(size, Image.Resampling.BOX)
    msk = Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)  # labels must not blend
    return np.asarray(img), np.asarray(msk)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): classes tinted in their colours and outlined, ignore pixels hatched grey."""
    out = image.astype(np.float32)
    lut = np.zeros((256, 3), dtype=np.float32)
    for cid in np.unique(mask):
        if cid not in (BACKGROUND, IGNORE):
            lut[cid] = class_color(int(cid))
    is_class = (mask != BACKGROUND) & (mask != IGNORE)
    colour = lut[mask]
    out[is_class] = (1 - OVERLAY_ALPHA) * out[is_class] + OVERLAY_ALPHA * colour[is_class]
    # Outline: class pixels with a differently labelled 4-neighbour take their class colour fully.
    edge = np.zeros_like(is_class)
    horizontal = mask[:, :-1] != mask[:, 1:]
    vertical = mask[:-1, :] != mask[1:, :]
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    edge[:-1, :] |= vertical
    edge[1:, :] |= vertical
    edge &= is_class
    out[edge] = colour[edge]
    ignore = mask == IGNORE
    if ignore.any():
        yy, xx = np.indices(mask.shape)
        stripes = ((xx + yy) // 3) % 2 == 0  # diagonal hatching
        out[ignore & stripes] = HATCH[0]
        out[ignore & ~stripes] = HATCH[1]
    return out.round().astype(np.uint8)


def _label_entries(sample: DecodedSample, names: list[str] | None) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, colour) of each class of the sample: prompted classes first, then any other label in the mask."""
    present = {int(c) for c in np.unique(sample.mask)} - {BACKGROUND, IGNORE}
    prompted = [int(c) for c in sample.meta.get("class_ids", [])]
    prompt_names = dict(zip(prompted, sample.meta.get("classes", [])))
    entries = []
    for cid in prompted + sorted(present - set(prompted)):
        if names is not None and 0 < cid <= len(names):
            name = names[cid - 1]
        else:
            name = prompt_names.get(cid, f"class {cid}")
        entries.append((name, class_color(cid) if cid in present else ABSENT_TEXT))
    return entries


def _draw_labels(draw: ImageDraw.ImageDraw, font, x0: int, y0: int, width: int, line_h: int,
                 key: str, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    draw.text((x0, y0), _clip(draw, font, key, width), fill=TEXT, font=font)
    x, line = x0, 1
    for i, (name, colour) in enumerate(entries):
        text = name + ("," if i < len(entries) - 1 else "")
        w = draw.textlength(text + " ", font=font)
        if x > x0 and x + w > x0 + width:  # next line, or stop with an ellipsis
            line += 1
            x = x0
            if line >= TEXT_LINES:
                draw.text((x0 + width - draw.textlength("...", font=font), y0 + (line - 1) * line_h), "...",
                          fill=TEXT, font=font)
                return
        draw.text((x, y0 + line * line_h), _clip(draw, font, text, width), fill=colour, font=font)
        x += w


def _clip(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    root: str | os.PathLike,
    out_png: str | os.PathLike,
    max_samples: int = 64,
    tile: int = 128,
    columns: int | None = None,
) -> Path | str:
    """Write a PNG grid of the run's first `max_samples` samples (completed shards, shard order).

    Each cell: the image (fitted to `tile` px) with its mask overlaid, then its key and its
    class names in their overlay colours (grey: prompted but no pixels). `root` and `out_png` may
    be folders/paths or URLs; the PNG is written whole. Returns `out_png` (a Path unless a URL).
    """
    layout = RunLayout(root)
    names = layout.read_classes() if layout.has_classes() else None
    samples = list(iter_samples(root, max_samples=max_samples))  # at most max_samples, small
    if not samples:
        raise ValueError(f"{root}: no samples in completed shards")

    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Ag,")
    line_h = bottom - top + 3
    cols = columns or math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    cell_w = tile + 2 * PAD
    cell_h = tile + 2 * PAD + TEXT_LINES * line_h
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x0, y0 = (i % cols) * cell_w + PAD, (i // cols) * cell_h + PAD
        image, mask = _fit(s.image, s.mask, tile)
        tile_img = Image.fromarray(overlay(image, mask))
        # centre smaller-than-tile images in their cell
        sheet.paste(tile_img, (x0 + (tile - tile_img.width) // 2, y0 + (tile - tile_img.height) // 2))
        _draw_labels(draw, font, x0, y0 + tile + 2, tile, line_h, s.key, _label_entries(s, names))

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return write_location(out_png, buf.getvalue())
